"""Webhook attempts recorded per second on PostgreSQL, with and without the subscription lock.

    .venv/bin/python bench/webhook_records.py --database-url URL [--per-recorder 300]

``record_attempt`` locks the subscription's row before the delivery's (the order of an
admin's change: ``_lock_subscription``). This measures what that costs: threads, each
with its own connection, record attempts (all successes, or all failures) of deliveries
claimed beforehand: one recorder; four on one subscription (several deliverers sending
to one receiver); four on a subscription each. Then the same with the lock replaced by
nothing (the subscription's row is still updated by every record, later in its
transaction). Prints records per second for each. The database's ``public`` schema is
dropped and recreated: never point it at data you want to keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import _tree  # noqa: F401  (this tree first on sys.path, before any project import)
from ingest import require_postgres, scratch_app  # bench/ingest.py
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from courier_api.extensions import db
from models import WebhookDelivery
from sync import outbox, webhooks
from sync.webhooks import ClaimedDelivery, DeliverySettings, SendResult

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
SETTINGS = DeliverySettings(disable_after_failures=10**9)
URL = "http://127.0.0.1:9/hook"


def claimed_deliveries(
    sessions: sessionmaker[Session], subscriptions: int, count: int
) -> list[ClaimedDelivery]:
    """``count`` deliveries spread over ``subscriptions`` new ones, claimed by ``w``."""
    with sessions.begin() as session:
        ids = [
            webhooks.create_subscription(
                session=session, url=URL, topics=["flag.raised"], production=False
            ).id
            for _ in range(subscriptions)
        ]
    with sessions.begin() as session:
        for n in range(count):
            outbox.announce(
                session=session,
                topic="flag.raised",
                ordering_key=f"k{n}",
                station_id=None,
                data={"n": n},
                now=T0,
                only_to=[ids[n % subscriptions]],
            )
        session.execute(
            update(WebhookDelivery).values(claimed_by="w", claimed_until=T0 + dt.timedelta(days=1))
        )
    with sessions() as session:
        rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        return [
            ClaimedDelivery(
                id=d.id,
                delivery_id=d.delivery_id,
                subscription_id=d.subscription_id,
                topic=d.topic,
                ordering_key=d.ordering_key,
                attempts=0,
                url=URL,
                secret="s",
                envelope={},
            )
            for d in rows
        ]


def records_per_second(
    sessions: sessionmaker[Session], claimed: list[ClaimedDelivery], recorders: int, ok: bool
) -> float:
    result = SendResult(status_code=200 if ok else 503)

    def record(part: list[ClaimedDelivery]) -> None:
        rng = random.Random(1)
        for n, delivery in enumerate(part):
            webhooks.record_attempt(
                sessions=sessions,
                claimed=delivery,
                result=result,
                at=T0 + dt.timedelta(seconds=n),
                settings=SETTINGS,
                worker_id="w",
                rng=rng,
            )

    threads = [
        threading.Thread(target=record, args=(claimed[i::recorders],)) for i in range(recorders)
    ]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(claimed) / (time.monotonic() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--per-recorder", type=int, default=300)
    args = parser.parse_args()
    require_postgres(args.database_url)
    lock = webhooks._lock_subscription
    with tempfile.TemporaryDirectory() as tmp:
        for locked in (True, False):
            webhooks._lock_subscription = lock if locked else (lambda *_: None)  # type: ignore[assignment]
            for recorders, subscriptions in ((1, 1), (4, 1), (4, 4)):
                for ok in (True, False):
                    app = scratch_app(args.database_url, Path(tmp))
                    engine = db.engine_of(app)
                    sessions = sessionmaker(bind=engine, expire_on_commit=False)
                    claimed = claimed_deliveries(
                        sessions, subscriptions, args.per_recorder * recorders
                    )
                    rate = records_per_second(sessions, claimed, recorders, ok)
                    print(
                        f"subscription lock {'yes' if locked else 'no '}, "
                        f"{recorders} recorder(s) on {subscriptions} subscription(s), "
                        f"{'successes' if ok else 'failures '}: {rate:5.0f} records/s",
                        flush=True,
                    )
                    engine.dispose()
    webhooks._lock_subscription = lock
    return 0


if __name__ == "__main__":
    sys.exit(main())
