"""The pull feed without Flask: a fresh PDA's snapshot, and its handoff to the feed.

Each step commits for real, in a session of its own as a request's: on PostgreSQL a
pull sees only entries of transactions ended (below the horizon), never those of the
test's own transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from models import Base, FeedKind, Station
from sync import feed
from tests import factories


@dataclass(frozen=True)
class Courier:
    new_session: Callable[[], Session]
    station_id: int
    courier_id: int

    def assigned(self, count: int) -> list[str]:
        """``count`` parcels assigned to the courier, each with its feed entry."""
        with self.new_session() as session:
            station = session.get_one(Station, self.station_id)
            parcels = [factories.parcel(session, station) for _ in range(count)]
            for parcel in parcels:
                parcel.courier_id = self.courier_id
            feed.record(
                session,
                [
                    feed.FeedEntry(
                        self.station_id, self.courier_id, FeedKind.PARCEL, p.tracking_no
                    )
                    for p in parcels
                ],
            )
            session.commit()
            return [p.tracking_no for p in parcels]

    def pull(self, cursor: feed.Cursor | None, limit: int) -> tuple[list[str], feed.FeedPage]:
        with self.new_session() as session:
            page = feed.read_page(
                session=session,
                station_id=self.station_id,
                courier_id=self.courier_id,
                cursor=cursor,
                limit=limit,
            )
            return [item.tracking_no for item in page.changes], page


@pytest.fixture
def courier(engine: Engine) -> Iterator[Courier]:
    def new_session() -> Session:
        return Session(engine, expire_on_commit=False)

    with new_session() as session:
        station = factories.station(session, code="FEED")
        user = factories.user(session, "feed-courier", "courier", station)
        session.commit()
        ids = (station.id, user.id)
    yield Courier(new_session, *ids)
    with engine.begin() as connection:  # the other tests never see these rows
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


def test_a_snapshot_with_nothing_after_it_says_it_is_the_last_page(courier: Courier) -> None:
    """A fresh PDA whose parcels fit in one page is told so (``has_more`` false) and
    handed a feed cursor: no extra request to learn that the feed holds nothing new.
    The cursor still gets everything committed after the snapshot."""
    held = courier.assigned(3)
    sent, first = courier.pull(None, limit=3)
    assert sent == held
    assert not first.has_more
    assert first.next_cursor.snapshot_after is None  # on with the feed next time

    later = courier.assigned(1)
    assert courier.pull(first.next_cursor, limit=10)[0] == later


def test_a_snapshot_paged_to_its_end_says_more_while_the_feed_has_newer_entries(
    courier: Courier,
) -> None:
    """The last snapshot page says ``has_more`` when the feed holds entries committed
    after the snapshot began, so the PDA pulls them at once; none missed."""
    held = courier.assigned(3)
    sent, first = courier.pull(None, limit=2)
    assert sent == held[:2] and first.has_more
    during = courier.assigned(1)  # committed between the snapshot's pages
    sent, last = courier.pull(first.next_cursor, limit=2)
    assert sent == [held[2], during[0]]  # the snapshot reads the parcels as they are now
    assert last.has_more and last.next_cursor.snapshot_after is None
    sent, rest = courier.pull(last.next_cursor, limit=10)
    assert sent == during and not rest.has_more


def test_a_fresh_pda_holding_nothing_is_told_there_is_nothing_more(courier: Courier) -> None:
    sent, first = courier.pull(None, limit=10)
    assert sent == [] and not first.has_more
