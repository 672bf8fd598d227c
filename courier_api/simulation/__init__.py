"""A station day played through the real API (``courier-api simulate``, ``make run``)."""

from courier_api.simulation.client import InProcess, OverHttp, SimulationError
from courier_api.simulation.plan import DayPlan, Expected, Names, plan_day
from courier_api.simulation.runner import Result, Simulation

__all__ = [
    "DayPlan",
    "Expected",
    "InProcess",
    "Names",
    "OverHttp",
    "Result",
    "Simulation",
    "SimulationError",
    "plan_day",
]
