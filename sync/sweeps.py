"""The scheduled sweeps (DESIGN.md "Scheduled work"): checks that raise and close flags,
consent expiry, and the retention purge of proof images.

Each sweep is ``(*, session, now, settings) -> dict``: it looks at the data as of
``now``, changes what must change, and returns what it did (counts, flag ids) for
the run's record. Running one again at the same ``now`` changes nothing. Each
reads through an index and works in batches, so its cost follows the rows that
are due, not the size of the tables.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from sqlalchemy import Row, Select, and_, or_, select, union, update
from sqlalchemy.orm import Session

from models import (
    Blob,
    Consent,
    DeviceSyncState,
    Flag,
    FlagSeverity,
    ProofImage,
    RejectedImage,
    Shift,
    ShiftStatus,
)
from sync import audit, scheduling
from sync.balances import missing_images
from sync.blobs import BlobStore
from sync.flags import (
    ACTIVE_STATUSES,
    FlagSubject,
    close_flags,
    raise_flag,
)
from sync.rules import Policy
from sync.shifts import (
    NO_OPEN_SHIFT,
    NOT_CLOSED,
    STALE_DEVICE,
    close_stale_device,
    lock_shift,
    station_clock,
    station_timezone,
)
from sync.status import rejudge_for_consent

SHIFT_NOT_CLOSED = NOT_CLOSED
BLOB_MISSING_AT_HANDOVER = "blob_missing_at_handover"
PROOF_RETENTION_PURGE = "proof_retention_purge"  # the job's name: it reads its last run
PURGE_ACTION = "proof_images_purged"
CONSENT_BATCH = 100  # re-judging a standing consent's parcels is the heavy part
PURGE_BATCH = 200  # digests listed in one audit entry
MAX_IDS_IN_DETAIL = 100  # a run's record stays small however much it did


@dataclass(frozen=True)
class SweepSettings:
    """What the sweeps need from the configuration (built at the edge)."""

    shift_close_grace: dt.timedelta = dt.timedelta(minutes=30)
    stale_device_after: dt.timedelta = dt.timedelta(minutes=45)
    blob_missing_grace: dt.timedelta = dt.timedelta(minutes=60)
    # Handovers older than this are no longer searched for missing images: by then a
    # missing image is a manager's matter. A flag raised before is still followed, so
    # that it closes when its images arrive (``blob_missing_at_handover``).
    blob_missing_lookback: dt.timedelta = dt.timedelta(days=14)
    proof_retention: dt.timedelta = dt.timedelta(days=365)
    policy: Policy = field(default_factory=Policy)
    blob_store: BlobStore | None = None
    batch_size: int = 500


# -- shifts and devices -----------------------------------------------------------------------


def shift_not_closed(
    *, session: Session, now: dt.datetime, settings: SweepSettings
) -> dict[str, Any]:
    """Open shifts past their planned end plus the grace: flag ``shift_not_closed``.

    Closing the shift closes the flag (``sync.shifts.close_shift``). Each shift is
    locked and read again before it is flagged, so a close that commits meanwhile
    is seen (else the flag would be raised for a closed shift, and stay); and the
    flags of shifts that are no longer open are closed, whatever closed them.
    """
    overdue = select(Shift.id).where(
        Shift.status == ShiftStatus.OPEN,
        Shift.planned_end_at < now - settings.shift_close_grace,
    )
    count, raised = 0, []
    for rows in _row_batches(session, overdue, Shift.id, settings.batch_size):
        for candidate in rows:
            shift = lock_shift(session, candidate.id)
            if shift.status != ShiftStatus.OPEN:
                continue
            count += 1
            result = raise_flag(
                session=session,
                kind=SHIFT_NOT_CLOSED,
                severity=FlagSeverity.WARNING,
                subject=FlagSubject("shift", str(shift.id)),
                station_id=shift.station_id,
                evidence={
                    "opened_at": shift.opened_at.isoformat(),
                    "planned_end_at": shift.planned_end_at.isoformat(),
                    "device_id": shift.device_id,
                },
                courier_id=shift.courier_id,
                shift_id=shift.id,
            )
            if result.new:
                raised.append(result.flag.id)
    session.flush()
    stale = session.scalars(
        select(Flag.subject_key)
        .join(Shift, Shift.id == Flag.shift_id)
        .where(
            Flag.kind == SHIFT_NOT_CLOSED,
            Flag.status.in_(ACTIVE_STATUSES),
            Shift.status != ShiftStatus.OPEN,
        )
    ).all()
    closed = close_flags(
        session=session,
        kind=SHIFT_NOT_CLOSED,
        subjects=[FlagSubject("shift", key) for key in stale],
        reason="the shift is no longer open",
    )
    return {
        "overdue_shifts": count,
        "flags_raised": _capped(raised),
        "flags_closed": _capped([flag.id for flag in closed]),
    }


def stale_device(*, session: Session, now: dt.datetime, settings: SweepSettings) -> dict[str, Any]:
    """Devices with an open shift that have not pushed for ``stale_device_after``: flag
    ``stale_device`` (subject: the device). The flags of devices heard from since, or
    with no open shift any more, are closed with the reason.

    Silence is counted from the device's last push, or from the shift's opening when
    that is later (opening a shift is done online, at the station).
    """
    silent_before = now - settings.stale_device_after
    open_shifts = (
        select(
            Shift.id,
            Shift.device_id,
            Shift.station_id,
            Shift.courier_id,
            Shift.opened_at,
            DeviceSyncState.last_push_at,
        )
        .outerjoin(DeviceSyncState, DeviceSyncState.device_id == Shift.device_id)
        .where(Shift.status == ShiftStatus.OPEN)
    )
    stale: list[str] = []
    heard: dict[str, str] = {}  # device -> why it is not stale
    raised: list[int] = []
    open_count = 0
    zones = _StationZones(session)
    for rows in _row_batches(session, open_shifts, Shift.id, settings.batch_size):
        for row in rows:
            open_count += 1
            pushed = row.last_push_at is not None and row.last_push_at >= row.opened_at
            heard_at = row.last_push_at if pushed else row.opened_at
            if heard_at >= silent_before:
                at = station_clock(heard_at, zones.of(row.station_id))
                heard[row.device_id] = (
                    f"the device pushed at {at}" if pushed else f"shift {row.id} opened at {at}"
                )
                continue
            stale.append(row.device_id)
            flag, newly_open = _raise_stale(session, row, now, heard_at, zones)
            if newly_open:
                raised.append(flag.id)
    closed = []
    quiet = set(stale)
    for flag in session.scalars(
        select(Flag).where(Flag.kind == STALE_DEVICE, Flag.status.in_(ACTIVE_STATUSES))
    ).all():
        if flag.subject_key in quiet:
            continue
        reason = heard.get(flag.subject_key, NO_OPEN_SHIFT)
        close_stale_device(session=session, device_id=flag.subject_key, reason=reason)
        closed.append(flag.id)
    session.flush()
    return {
        "open_shifts": open_count,
        "stale_devices": _capped(sorted(stale)),
        "flags_raised": _capped(raised),
        "flags_closed": _capped(closed),
    }


class _StationZones:
    """Stations' time zones, each read once: a sweep's reasons and notes tell times on
    the station's clock (``sync.shifts.station_clock``), as its pages show them."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.known: dict[int, str] = {}

    def of(self, station_id: int) -> str:
        if station_id not in self.known:
            self.known[station_id] = station_timezone(self.session, station_id)
        return self.known[station_id]


def _raise_stale(
    session: Session,
    row: Row[Any],
    now: dt.datetime,
    heard_at: dt.datetime,
    zones: _StationZones,
) -> tuple[Flag, bool]:
    """Raise (or update) the device's flag; and whether it is newly open.

    One flag per device and station: a manager's decision covers the silence it was
    made on (the flag's shift and the device's last push, ``sync.flags.SEEN``), not one
    in a later shift, nor one after the device pushed again (``raise_flag`` opens it)."""
    last_push_at = row.last_push_at.isoformat() if row.last_push_at else None
    result = raise_flag(
        session=session,
        kind=STALE_DEVICE,
        severity=FlagSeverity.WARNING,
        subject=FlagSubject("device", row.device_id),
        station_id=row.station_id,
        evidence={
            "last_push_at": last_push_at,
            "shift_id": row.id,
            "silent_minutes": int((now - heard_at).total_seconds() // 60),
        },
        courier_id=row.courier_id,
        shift_id=row.id,
        again=f"silent again, in shift {row.id}, since its push at "
        f"{station_clock(row.last_push_at, zones.of(row.station_id))}"
        if row.last_push_at
        else f"silent again, in shift {row.id}",
    )
    flag = result.flag
    if flag.shift_id != row.id:
        flag.shift_id = row.id
    return flag, result.new


# -- proof images at handover -----------------------------------------------------------------


def blob_missing_at_handover(
    *, session: Session, now: dt.datetime, settings: SweepSettings
) -> dict[str, Any]:
    """Shifts closed more than ``blob_missing_grace`` ago whose deliveries name proof
    images the server still lacks: flag ``blob_missing_at_handover`` (subject: the
    shift), listing the images and events; the flag closes once every image arrived.

    Deliveries voided by a correction do not count, nor, for the grace, those that
    arrived after the handover (a PDA offline at the close): their images may be on
    their way, and the shift's flag is left as it is meanwhile. Shifts are found by
    their planned end (indexed) within ``blob_missing_lookback``; older ones only
    while their flag is open or acknowledged, so that it still closes when the
    images arrive, however late.
    """
    handed_over = select(Shift.id, Shift.station_id, Shift.courier_id).where(
        Shift.status.in_((ShiftStatus.CLOSED, ShiftStatus.SIGNED_OFF)),
        Shift.closed_at <= now - settings.blob_missing_grace,
    )
    lookback_start = now - settings.blob_missing_lookback
    recent = handed_over.where(Shift.planned_end_at >= lookback_start)
    older_still_flagged = handed_over.where(
        Shift.planned_end_at < lookback_start,
        Shift.id.in_(
            select(Flag.shift_id).where(
                Flag.kind == BLOB_MISSING_AT_HANDOVER, Flag.status.in_(ACTIVE_STATUSES)
            )
        ),
    )
    checked, raised, closed, missing_count = 0, [], [], 0
    for shifts in chain(
        _row_batches(session, recent, Shift.id, settings.batch_size),
        _row_batches(session, older_still_flagged, Shift.id, settings.batch_size),
    ):
        checked += len(shifts)
        missing, pending = missing_images(
            session, [s.id for s in shifts], arrived_before=now - settings.blob_missing_grace
        )
        complete = []
        for shift in shifts:
            if shift.id not in missing:
                if shift.id not in pending:
                    complete.append(FlagSubject("shift", str(shift.id)))
                continue
            digests, event_ids = missing[shift.id]
            missing_count += len(digests)
            evidence = {"blobs": sorted(digests), "event_ids": sorted(event_ids)}
            result = raise_flag(
                session=session,
                kind=BLOB_MISSING_AT_HANDOVER,
                severity=FlagSeverity.WARNING,
                subject=FlagSubject("shift", str(shift.id)),
                station_id=shift.station_id,
                evidence=evidence,
                courier_id=shift.courier_id,
                shift_id=shift.id,
                # A manager's decision covers the images it saw missing, not one gone
                # missing since (a delivery pushed after it): the flag is open again.
                again="more images missing",
            )
            flag = result.flag
            if flag.evidence != evidence:  # what is missing now, not what ever was
                flag.evidence = evidence
            if result.new:
                raised.append(flag.id)
        closed += [
            flag.id
            for flag in close_flags(
                session=session,
                kind=BLOB_MISSING_AT_HANDOVER,
                subjects=complete,
                reason="every proof image named by the shift's deliveries has arrived",
            )
        ]
    session.flush()
    return {
        "shifts_checked": checked,
        "missing_blobs": missing_count,
        "flags_raised": _capped(raised),
        "flags_closed": _capped(closed),
    }


# -- consents ---------------------------------------------------------------------------------


def consent_expiry(
    *, session: Session, now: dt.datetime, settings: SweepSettings
) -> dict[str, Any]:
    """Consents that expired and were not announced yet: the parcels they cover are
    judged again and the couriers holding them get a ``consent`` entry in their pull
    feed (PDAs drop the lapsed consent); then the consent is marked announced.

    A consent revoked before it expired was announced by its revocation. Committed
    batch by batch.
    """
    announced: list[int] = []
    rejudged = 0
    lapsed = (
        select(Consent)
        .where(
            Consent.expiry_announced_at.is_(None),
            Consent.expires_at.is_not(None),
            Consent.expires_at <= now,
        )
        .order_by(Consent.expires_at, Consent.id)
        .limit(CONSENT_BATCH)
    )
    while batch := session.scalars(lapsed).all():
        for consent in batch:
            assert consent.expires_at is not None
            if consent.revoked_at is None or consent.revoked_at > consent.expires_at:
                rejudged += len(
                    rejudge_for_consent(session=session, consent=consent, policy=settings.policy)
                )
            consent.expiry_announced_at = now
            announced.append(consent.id)
        session.commit()
    return {
        "announced": len(announced),
        "parcels_rejudged": rejudged,
        "consent_ids": _capped(announced),
    }


# -- retention --------------------------------------------------------------------------------


def proof_retention_purge(
    *, session: Session, now: dt.datetime, settings: SweepSettings
) -> dict[str, Any]:
    """Delete the bytes of proof images uploaded more than ``proof_retention`` ago.

    Batch by batch, oldest first: the rows are marked ``purged_at`` (they stay, as
    the record that the image existed) and one audit entry lists the batch's
    digests; that is committed, and only then are the bytes deleted (of the images
    still purged by then: ``_delete_purged_bytes``). A crash in
    between leaves files of purged images behind: every run deletes the files of
    the purged images it passes, and it starts where the last successful run
    ended (``through``, kept in that run's record), so it passes exactly the images
    of runs that did not finish. Purging walks images in upload order, so the
    purged ones always come first.
    """
    store = settings.blob_store
    if store is None:
        raise ValueError("the retention purge needs a blob store")
    cutoff = now - settings.proof_retention
    position = _purged_through(session)
    purged, files_deleted, leftovers, entries = 0, 0, 0, []
    while True:
        query = (
            select(Blob.sha256, Blob.uploaded_at, Blob.purged_at)
            .where(Blob.uploaded_at < cutoff)
            .order_by(Blob.uploaded_at, Blob.sha256)
            .limit(PURGE_BATCH)
        )
        if position is not None:
            query = query.where(
                or_(
                    Blob.uploaded_at > position[0],
                    and_(Blob.uploaded_at == position[0], Blob.sha256 > position[1]),
                )
            )
        rows = session.execute(query).all()
        if not rows:
            break
        due = [row.sha256 for row in rows if row.purged_at is None]
        if due:
            session.execute(
                update(Blob)
                .where(Blob.sha256.in_(due), Blob.purged_at.is_(None))
                .values(purged_at=now)
                .execution_options(synchronize_session=False)
            )
            entry = audit.append(
                session=session,
                actor_id=None,
                action=PURGE_ACTION,
                subject_type="blob",
                subject_key=due[0],
                details={
                    "count": len(due),
                    "digests": due,
                    "cutoff": cutoff.isoformat(),
                    "retention_days": settings.proof_retention.days,
                },
                parcels=_parcels_of_images(session, due),
            )
            session.commit()  # the purge is on record before any byte goes
            purged += len(due)
            entries.append(entry.id)
        files_deleted += _delete_purged_bytes(session, store, due)
        leftovers += _delete_purged_bytes(
            session, store, [row.sha256 for row in rows if row.purged_at is not None]
        )
        position = (rows[-1].uploaded_at, rows[-1].sha256)
        if len(rows) < PURGE_BATCH:
            break
    return {
        "cutoff": cutoff.isoformat(),
        "purged": purged,
        "files_deleted": files_deleted,
        "leftover_files_deleted": leftovers,
        "audit_entries": _capped(entries),
        "through": None
        if position is None
        else {"uploaded_at": position[0].isoformat(), "sha256": position[1]},
    }


def _parcels_of_images(session: Session, digests: Sequence[str]) -> list[str]:
    """The parcels whose proofs name any of ``digests`` (``ix_proof_image_sha256``), or
    whose rejected events do (``ix_rejected_image_sha256``), as an auditor's read of one
    is filed (``sync.blobs.parcels_naming``): a purge entry is filed under them, so that
    an auditor settling a dispute about one reads in its history (``GET
    /audit?tracking_no=``) when and why its proof's images went, not only that they are
    gone."""
    query = union(
        select(ProofImage.tracking_no).where(ProofImage.sha256.in_(digests)),
        select(RejectedImage.tracking_no).where(RejectedImage.sha256.in_(digests)),
    )
    return sorted(session.scalars(query))


def _delete_purged_bytes(session: Session, store: BlobStore, digests: Sequence[str]) -> int:
    """Delete the bytes of those of ``digests`` still purged, holding their rows locked
    until done; how many files were deleted.

    A PDA may upload a purged image again meanwhile (a new proof names it), which
    brings it back (``sync.blobs``) under the same row lock: either the upload comes
    first and its bytes are left alone, or it waits and writes them after the
    deletion. Without the lock the deletion could follow the upload, leaving a row
    that says present over bytes gone for good.
    """
    if not digests:
        return 0
    still_purged = session.scalars(
        select(Blob.sha256)
        .where(Blob.sha256.in_(digests), Blob.purged_at.is_not(None))
        .order_by(Blob.sha256)
        .with_for_update()
    ).all()
    deleted = sum(store.delete(digest) for digest in still_purged)
    session.commit()
    return deleted


def _purged_through(session: Session) -> tuple[dt.datetime, str] | None:
    """Where the last successful purge ended: every image up to it is purged, bytes gone."""
    last = scheduling.latest_run(session, job=PROOF_RETENTION_PURGE, outcome=scheduling.OK)
    through = (last.detail or {}).get("through") if last is not None else None
    try:
        return dt.datetime.fromisoformat(through["uploaded_at"]), str(through["sha256"])
    except (TypeError, KeyError, ValueError):
        return None  # no such run (or not one of ours): walk from the oldest image


# -- helpers ----------------------------------------------------------------------------------


def _row_batches(
    session: Session, query: Select[Any], key: Any, size: int
) -> Iterator[Sequence[Row[Any]]]:
    """The rows ``query`` selects (its first column is ``key``), ``size`` at a time, by
    keyset on ``key``."""
    after = None
    while True:
        page = query.order_by(key).limit(size)
        if after is not None:
            page = page.where(key > after)
        rows = session.execute(page).all()
        if rows:
            yield rows
        if len(rows) < size:
            return
        after = rows[-1][0]


def _capped(ids: list[Any]) -> list[Any]:
    return ids[:MAX_IDS_IN_DETAIL]
