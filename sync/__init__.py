"""Domain rules and services of the courier field API.

Plain Python and SQLAlchemy: nothing here imports Flask (a test checks it),
so rules run in property tests without a web app or, where pure, a database.
"""
