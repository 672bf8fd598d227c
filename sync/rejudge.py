"""Every parcel judged again under the rules and settings in force now.

A parcel is judged when something about it changes: its events, a consent that
covers it, an image its proof names, its intake. A rule changed by an upgrade (what
counts as a proof of delivery, say) or a policy setting changed in the configuration
(``CONSENT_RECORDING_GRACE_MINUTES``, the classes that need a consent ...) reaches a
parcel only then, so two parcels dropped alike on one day could stand judged under
two rules. ``courier-api rejudge`` runs this. First the drops' bounds are worked out
again from their PDAs' events (``sync.drop_bounds.rebound``: an upgrade that brought
them leaves the drops the version before stored meanwhile without them), in
transactions of ``batch`` drops by device and seq, each holding those devices' locks
(their pushes wait for it). Then each parcel's status, holder and rule flags are
recomputed as a push recomputes them (``sync.status.reproject``), and the closed
shifts holding parcels whose ``delivered_not_checked_out`` flag moved, or with a
final outcome scanned again (a shift whose only scan of a parcel repeats another
shift's outcome raises no ``not_on_manifest``), get their handover flags again, in
transactions of ``batch`` parcels in tracking-number order.
Each batch locks its parcels as a push does, so it is safe while the service runs
(on SQLite, pushes wait for each batch), and safe to run again: a second run changes
nothing.

Between the two, rule 6's ``time_inversion`` flags are judged again against their
PDAs' stored events (``sync.inversion_flags``), in transactions of ``batch`` flags
holding their PDAs' locks: a seq a flag names that no inverted pair of neighbours names
now (a pair judged across a rejected seq stored since, before pushes judged such
pairs again) is withdrawn, and a flag left naming none is closed, as a push now does;
and the pairs across the seqs written off as lost are judged, in transactions of
``batch`` PDAs, as a write-off now does (one made after both neighbours arrived judged
none before).

Other flags about the events as they arrived (clock, sequence numbers, a parcel not
taken in, another station's scan) are not judged again: they say what the PDA sent. Run it
once the serving processes have the new settings: until then their pushes judge the
parcels they touch under the old ones. A batch that a live push or intake makes the
database give up (a deadlock on PostgreSQL, as an intake can meet) is tried again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from models import Flag, Parcel
from sync import audit
from sync.balances import refresh_for_parcels
from sync.drop_bounds import drops_after, rebound
from sync.inversion_flags import DEFAULT_TOLERANCE, rejudge_flags, rejudge_written_off
from sync.rules import Policy
from sync.sql import aborted_for_a_conflict
from sync.status import ReprojectOutcome, reproject
from sync.wording import counted

REJUDGE_STARTED_ACTION = "parcels_rejudge_started"
REJUDGED_ACTION = "parcels_rejudged"
ATTEMPTS = 3  # per batch
RETRY_SECONDS = 0.5  # before the second attempt; twice that before the third

log = logging.getLogger(__name__)


@dataclass
class RejudgeTotals:
    parcels: int = 0
    status_changed: int = 0  # the status moved (a holder alone moving is not counted)
    flags_raised: int = 0  # rule flags raised or reopened
    flags_rejudged: int = 0  # rule flags closed, resolved again, or given other evidence
    handover_flags_raised: int = 0  # of closed shifts (those whose cause went are closed)
    drop_bounds_changed: int = 0  # drops whose bounds (``sync.drop_bounds``) were repaired
    # time_inversion flags (``sync.inversion_flags``): their seqs withdrawn, closed, and
    # raised (or opened again): across seqs written off, and at the station a pair's later
    # event was pushed at when another station's flag named it (``Rejudged.raised``)
    inversion_seqs_withdrawn: int = 0
    inversion_flags_closed: int = 0
    inversion_flags_raised: int = 0

    def summary(self) -> str:
        bounds = counted(self.drop_bounds_changed, "drop's bounds", "drops' bounds")
        return (
            f"{counted(self.parcels, 'parcel')} judged again: {self.status_changed} changed "
            f"status, {counted(self.flags_raised, 'rule flag')} raised, {self.flags_rejudged} "
            f"closed or changed, {counted(self.handover_flags_raised, 'handover flag')} of "
            "closed shifts raised, "
            f"{bounds} repaired; "
            "time_inversion flags judged again: "
            f"{counted(self.inversion_seqs_withdrawn, 'seq')} withdrawn, "
            f"{counted(self.inversion_flags_closed, 'flag')} closed, "
            f"{self.inversion_flags_raised} raised (across seqs written off, or at their later "
            "event's station)"
        )


def rejudge_parcels(
    *,
    session: Session,
    policy: Policy,
    station_id: int | None = None,
    batch: int = 500,
    progress: Callable[[RejudgeTotals], None] | None = None,
    inversion_tolerance: dt.timedelta = DEFAULT_TOLERANCE,
) -> RejudgeTotals:
    """Judge every parcel (of ``station_id``, or all) again; commits each batch. The
    audit log records the run as it starts, with the policy applied (a run that stops
    half way has changed what its batches committed), and its totals as it ends. Who
    ran it is not known here: the command line. ``inversion_tolerance``: the
    configured ``TIME_INVERSION_TOLERANCE_SECONDS``."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    subject = {
        "subject_type": "station" if station_id is not None else "service",
        "subject_key": str(station_id) if station_id is not None else "all",
    }
    audit.append(
        session=session,
        actor_id=None,
        action=REJUDGE_STARTED_ACTION,
        details={"policy": _settings(policy, inversion_tolerance), "batch": batch},
        **subject,
    )
    session.commit()
    totals = RejudgeTotals()
    bounded: tuple[str, int] = ("", 0)
    while drops := drops_after(session, station_id=station_id, after=bounded, limit=batch):
        totals.drop_bounds_changed += _committed(
            session, partial(rebound, session, drops), f"drops after {bounded}"
        )
        bounded = (drops[-1].device_id, drops[-1].seq)
        if progress is not None:
            progress(totals)
    _inversions_judged_again(session, totals, station_id, batch, inversion_tolerance, progress)
    after = ""
    while True:
        query = select(Parcel.tracking_no).where(Parcel.tracking_no > after)
        if station_id is not None:
            query = query.where(Parcel.station_id == station_id)
        numbers = list(session.scalars(query.order_by(Parcel.tracking_no).limit(batch)))
        if not numbers:
            break
        outcome, handover = _committed(
            session, partial(_judged_again, session, numbers, policy), f"batch from {numbers[0]}"
        )
        totals.parcels += len(numbers)
        totals.status_changed += len(outcome.changed)
        totals.flags_raised += len(outcome.raised)
        totals.flags_rejudged += len(outcome.rejudged)
        totals.handover_flags_raised += len(handover)
        after = numbers[-1]
        if progress is not None:
            progress(totals)
    audit.append(
        session=session,
        actor_id=None,
        action=REJUDGED_ACTION,
        details={**dataclasses.asdict(totals), "policy": _settings(policy, inversion_tolerance)},
        **subject,
    )
    session.commit()
    return totals


def _inversions_judged_again(
    session: Session,
    totals: RejudgeTotals,
    station_id: int | None,
    batch: int,
    tolerance: dt.timedelta,
    progress: Callable[[RejudgeTotals], None] | None,
) -> None:
    """The ``time_inversion`` flags judged again, then the pairs across seqs written
    off, ``batch`` flags or PDAs per transaction, a progress line after each."""
    after_id: int | None = 0
    while after_id is not None:
        start = after_id
        done, after_id = _committed(
            session,
            partial(
                rejudge_flags,
                session=session,
                after_id=start,
                limit=batch,
                tolerance=tolerance,
                station_id=station_id,
            ),
            f"time_inversion flags after {start}",
        )
        totals.inversion_seqs_withdrawn += done.withdrawn
        totals.inversion_flags_closed += done.closed
        totals.inversion_flags_raised += done.raised
        if after_id is not None and progress is not None:
            progress(totals)
    after_device: str | None = ""
    while after_device is not None:
        start_device = after_device
        raised, after_device = _committed(
            session,
            partial(
                rejudge_written_off,
                session=session,
                after_device=start_device,
                limit=batch,
                tolerance=tolerance,
                station_id=station_id,
            ),
            f"seqs written off of the PDAs after {start_device!r}",
        )
        totals.inversion_flags_raised += raised
        if after_device is not None and progress is not None:
            progress(totals)


T = TypeVar("T")


def _judged_again(
    session: Session, numbers: list[str], policy: Policy
) -> tuple[ReprojectOutcome, list[Flag]]:
    """One batch of parcels judged again, with the closed shifts that holds."""
    outcome = reproject(session=session, tracking_nos=numbers, policy=policy)
    handover = refresh_for_parcels(
        session=session, tracking_nos=sorted(outcome.not_checked_out_changed() | outcome.repeated)
    )
    return outcome, handover


def _committed(session: Session, work: Callable[[], T], what: str) -> T:
    """``work()``, committed; tried again from the start when the database gives it up
    for another transaction (a deadlock or a serialization failure on PostgreSQL, the
    busy timeout on SQLite): live pushes and intakes lock the same devices, parcels
    and shifts."""
    attempt = 1
    while True:
        try:
            result = work()
            session.commit()
            return result
        except DBAPIError as error:
            session.rollback()
            if attempt == ATTEMPTS or not _given_up_for_another(error):
                raise
            log.warning("rejudge: %s given up (%s); again", what, error.orig)
            time.sleep(RETRY_SECONDS * attempt)
            attempt += 1


def _given_up_for_another(error: DBAPIError) -> bool:
    if aborted_for_a_conflict(error):
        return True
    return isinstance(error, OperationalError) and "database is locked" in str(error.orig)


def _settings(policy: Policy, inversion_tolerance: dt.timedelta) -> dict[str, Any]:
    """The policy the parcels were judged under, as the audit log keeps it."""
    return {
        "time_inversion_tolerance": str(inversion_tolerance),
        "consent_required": sorted(c.value for c in policy.consent_required),
        "signature_required": sorted(c.value for c in policy.signature_required),
        "far_from_address_m": str(policy.far_from_address_m),  # the audit chain: no floats
        "consent_recording_grace": str(policy.consent_recording_grace),
        "clock_uncertainty": str(policy.clock_uncertainty),
    }
