"""Extensions, created unbound and initialised by ``create_app``."""

from courier_api.api.base import CourierApi
from courier_api.database import Database

db = Database()
api = CourierApi()
