"""A proof's own arithmetic, without a database."""

import datetime as dt

from models import EventType, ScanEvent
from sync.proofs import Proof

SERVER = dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC)


def _proof(occurred_at_device: dt.datetime) -> Proof:
    event = ScanEvent(
        type=EventType.DELIVERED,
        occurred_at=SERVER,
        occurred_at_device=occurred_at_device,
    )
    return Proof(event=event, parcel=None, distance_m=None, voided=False)


def test_the_clock_offset_is_the_pdas_clock_minus_the_servers_in_whole_milliseconds() -> None:
    """What an auditor reads as the correction a delivery's time was given: a PDA two
    minutes fast is +120000, one slow is negative; a part of a millisecond is rounded."""
    assert _proof(SERVER + dt.timedelta(minutes=2)).clock_offset_ms == 120_000
    assert _proof(SERVER - dt.timedelta(seconds=3, milliseconds=250)).clock_offset_ms == -3_250
    assert _proof(SERVER + dt.timedelta(microseconds=1_600)).clock_offset_ms == 2
    assert _proof(SERVER).clock_offset_ms == 0
