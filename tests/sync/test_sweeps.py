"""The scheduled sweeps, with controlled time: due, not before; idempotent; convergent."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from sqlalchemy import Connection, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from models import (
    AuditEntry,
    Blob,
    Consent,
    ConsentChannel,
    ConsentMethod,
    ConsentScope,
    FeedChange,
    FeedKind,
    Flag,
    FlagChange,
    FlagSeverity,
    FlagStatus,
    Parcel,
    ScanEvent,
    Shift,
)
from sync import audit, shifts, sweeps
from sync.blobs import FileBlobStore, store_blob
from sync.consents import ConsentDraft, ConsentRules, grant
from sync.events import EventRules
from sync.flags import resolve_flag
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.scheduling import Job, run_job
from sync.shifts import ShiftRules
from sync.sweeps import SweepSettings
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories
from tests.conftest import World

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
SHANGHAI = ZoneInfo("Asia/Shanghai")  # the test world's station
OPENED = NOW - dt.timedelta(hours=4)
TRACKING = TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS)
RULES = IngestRules(events=EventRules(tracking=TRACKING))
SETTINGS = SweepSettings()  # 30 / 45 / 60 minutes, 365 days


def minutes(n: float) -> dt.timedelta:
    return dt.timedelta(minutes=n)


def image(color: tuple[int, int, int]) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest(), data


class Pda:
    """The test world's PDA: opens a shift, numbers its events, pushes them."""

    def __init__(self, session: Session, world: World) -> None:
        self.session = session
        self.world = world
        self.pusher = Pusher(world.device.id, world.station.id, world.courier.id)
        self.seq = 0

    def open(self, *, planned_end_at: dt.datetime | None = None) -> Shift:
        shift = shifts.open_shift(
            session=self.session,
            device=self.world.device,
            courier_id=self.world.courier.id,
            rules=ShiftRules(),
            planned_end_at=planned_end_at,
            now=OPENED,
        )
        self.session.commit()
        return shift

    def event(self, tracking_no: str, type: str = "checked_out", **fields: Any) -> dict:
        self.seq += 1
        fields.setdefault("occurred_at", OPENED + minutes(self.seq))
        return factories.event(self.seq, tracking_no, type, **fields)

    def push(self, events: list[dict], *, at: dt.datetime) -> dict[str, Any]:
        receipt = ingest(
            session=self.session,
            batch=PushBatch(self.pusher.device_id, uuid.uuid4(), at, events),
            pusher=self.pusher,
            rules=RULES,
            received_at=at,
        )
        self.session.commit()
        return receipt

    def close(self, shift: Shift, *, at: dt.datetime) -> Shift:
        shift = shifts.close_shift(
            session=self.session, shift=shift, closed_by=self.world.courier.id, now=at
        )
        self.session.commit()
        return shift


@pytest.fixture
def pda(session: Session, world: World) -> Pda:
    return Pda(session, world)


def sweep(session: Session, function: Any, now: dt.datetime, **settings: Any) -> dict[str, Any]:
    detail = function(session=session, now=now, settings=SweepSettings(**settings))
    session.commit()
    return detail


def flags_of(session: Session, kind: str) -> list[Flag]:
    session.expire_all()
    return list(session.scalars(select(Flag).where(Flag.kind == kind).order_by(Flag.id)))


def changes(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(FlagChange)) or 0


# -- shift_not_closed -----------------------------------------------------------------------------


def test_a_shift_left_open_past_its_planned_end_is_flagged_once(
    session: Session, world: World, pda: Pda
) -> None:
    planned_end = OPENED + dt.timedelta(hours=3)
    shift = pda.open(planned_end_at=planned_end)

    early = sweep(session, sweeps.shift_not_closed, planned_end + minutes(29))
    assert early == {"overdue_shifts": 0, "flags_raised": [], "flags_closed": []}
    assert flags_of(session, "shift_not_closed") == []

    raised = sweep(session, sweeps.shift_not_closed, planned_end + minutes(31))

    [flag] = flags_of(session, "shift_not_closed")
    assert raised == {"overdue_shifts": 1, "flags_raised": [flag.id], "flags_closed": []}
    assert (flag.subject_type, flag.subject_key, flag.shift_id) == (
        "shift",
        str(shift.id),
        shift.id,
    )
    assert (flag.station_id, flag.courier_id) == (world.station.id, world.courier.id)
    assert (flag.severity, flag.status) == (FlagSeverity.WARNING, FlagStatus.OPEN)
    assert flag.evidence == {
        "opened_at": OPENED.isoformat(),
        "planned_end_at": planned_end.isoformat(),
        "device_id": world.device.id,
    }
    history = changes(session)

    again = sweep(session, sweeps.shift_not_closed, planned_end + minutes(45))

    assert again == {"overdue_shifts": 1, "flags_raised": [], "flags_closed": []}
    assert [f.id for f in flags_of(session, "shift_not_closed")] == [flag.id]
    assert changes(session) == history

    pda.close(shift, at=planned_end + minutes(50))
    [closed] = flags_of(session, "shift_not_closed")
    assert closed.status == FlagStatus.CLOSED
    assert (
        sweep(session, sweeps.shift_not_closed, planned_end + minutes(60))["overdue_shifts"] == 0
    )
    assert flags_of(session, "shift_not_closed")[0].status == FlagStatus.CLOSED


def test_a_shift_not_closed_flag_closed_by_the_close_tells_the_close_on_the_stations_clock(
    session: Session, world: World, pda: Pda
) -> None:
    """The manager at 19:00 in Shanghai reads, on the flag's page, why the system closed
    it: the close at 19:50 there, as the page's other times read, not at 11:50 "+00:00",
    hours off beside them."""
    planned_end = OPENED + dt.timedelta(hours=3)
    shift = pda.open(planned_end_at=planned_end)
    sweep(session, sweeps.shift_not_closed, planned_end + minutes(31))
    closed_at = planned_end + minutes(50)  # 11:50 UTC

    pda.close(shift, at=closed_at)

    [flag] = flags_of(session, "shift_not_closed")
    assert flag.closed_reason == "the shift was closed at 2026-11-23T19:50:00+08:00"
    note = session.scalars(
        select(FlagChange.note).where(FlagChange.flag_id == flag.id).order_by(FlagChange.id)
    ).all()[-1]
    assert note == flag.closed_reason


def test_a_silent_device_flag_opened_again_tells_its_last_push_on_the_stations_clock(
    session: Session, world: World, pda: Pda
) -> None:
    """A resolved stale_device flag opens again when the PDA falls silent again: the
    history says since when, at the station's time, as the page's times read."""
    [tn] = [factories.parcel(session, world.station).tracking_no]
    pda.open()
    sweep(session, sweeps.stale_device, OPENED + minutes(50))
    [flag] = flags_of(session, "stale_device")
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="dead zone")
    session.commit()
    pda.push([pda.event(tn)], at=OPENED + minutes(60))  # 09:00 UTC, 17:00 in Shanghai

    sweep(session, sweeps.stale_device, OPENED + minutes(180))

    last = session.scalars(
        select(FlagChange).where(FlagChange.flag_id == flag.id).order_by(FlagChange.id.desc())
    ).first()
    assert last is not None and last.note == (
        f"silent again, in shift {flag.shift_id}, since its push at 2026-11-23T17:00:00+08:00"
    )


# -- stale_device ---------------------------------------------------------------------------------


def test_a_silent_device_with_an_open_shift_is_flagged_until_it_pushes_again(
    session: Session, world: World, pda: Pda
) -> None:
    [tn] = [factories.parcel(session, world.station).tracking_no]
    shift = pda.open()
    pushed = OPENED + minutes(10)
    pda.push([pda.event(tn)], at=pushed)

    assert sweep(session, sweeps.stale_device, pushed + minutes(44))["stale_devices"] == []
    assert flags_of(session, "stale_device") == []

    raised = sweep(session, sweeps.stale_device, pushed + minutes(46))

    [flag] = flags_of(session, "stale_device")
    assert raised == {
        "open_shifts": 1,
        "stale_devices": [world.device.id],
        "flags_raised": [flag.id],
        "flags_closed": [],
    }
    assert (flag.subject_type, flag.subject_key) == ("device", world.device.id)
    assert (flag.shift_id, flag.courier_id, flag.station_id) == (
        shift.id,
        world.courier.id,
        world.station.id,
    )
    assert flag.evidence == {
        "last_push_at": pushed.isoformat(),
        "shift_id": shift.id,
        "silent_minutes": 46,
    }
    history = changes(session)

    again = sweep(session, sweeps.stale_device, pushed + minutes(46))
    assert again["flags_raised"] == [] and again["flags_closed"] == []
    assert changes(session) == history
    assert flags_of(session, "stale_device")[0].evidence["silent_minutes"] == 46

    back = pushed + minutes(50)
    pda.push([pda.event(tn, "out_for_delivery")], at=back)
    closed = sweep(session, sweeps.stale_device, back + minutes(1))

    [flag] = flags_of(session, "stale_device")
    assert closed["flags_closed"] == [flag.id] and closed["stale_devices"] == []
    assert flag.status == FlagStatus.CLOSED
    # On the station's clock (Asia/Shanghai), as the flag's page shows its other times.
    assert flag.closed_reason == (
        f"the device pushed at {back.astimezone(SHANGHAI).isoformat(timespec='seconds')}"
    )

    silent_again = sweep(session, sweeps.stale_device, back + minutes(60))

    assert silent_again["flags_raised"] == [flag.id]  # the same flag, raised again
    [flag] = flags_of(session, "stale_device")
    assert flag.status == FlagStatus.OPEN and flag.evidence["silent_minutes"] == 60


def test_a_stale_device_flag_closes_when_the_shift_closes(
    session: Session, world: World, pda: Pda
) -> None:
    shift = pda.open()  # never pushes: silence counts from the opening
    sweep(session, sweeps.stale_device, OPENED + minutes(50))
    [flag] = flags_of(session, "stale_device")
    assert flag.evidence == {"last_push_at": None, "shift_id": shift.id, "silent_minutes": 50}

    pda.close(shift, at=OPENED + minutes(55))  # the close closes it, as the sweep would

    [flag] = flags_of(session, "stale_device")
    assert flag.status == FlagStatus.CLOSED
    assert flag.closed_reason == "the device has no open shift any more"
    detail = sweep(session, sweeps.stale_device, OPENED + minutes(60))
    assert detail["open_shifts"] == 0 and detail["flags_closed"] == []


def test_a_device_is_not_stale_right_after_opening_a_shift(
    session: Session, world: World, pda: Pda
) -> None:
    [tn] = [factories.parcel(session, world.station).tracking_no]
    pda.push([pda.event(tn)], at=OPENED - dt.timedelta(days=1))  # pushed yesterday
    pda.open()

    detail = sweep(session, sweeps.stale_device, OPENED + minutes(20))

    assert detail["open_shifts"] == 1 and detail["stale_devices"] == []
    assert flags_of(session, "stale_device") == []


def test_a_resolved_stale_device_flag_opens_again_in_the_next_shift(
    session: Session, world: World, pda: Pda
) -> None:
    first = pda.open()
    sweep(session, sweeps.stale_device, OPENED + minutes(50))
    [flag] = flags_of(session, "stale_device")
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="dead zone")
    session.commit()
    sweep(session, sweeps.stale_device, OPENED + minutes(70))  # the same silence: stays
    assert flags_of(session, "stale_device")[0].status == FlagStatus.RESOLVED

    pda.close(first, at=OPENED + minutes(80))
    second = shifts.open_shift(
        session=session,
        device=world.device,
        courier_id=world.courier.id,
        rules=ShiftRules(),
        now=OPENED + minutes(90),
    )
    session.commit()
    detail = sweep(session, sweeps.stale_device, OPENED + minutes(140))

    [flag] = flags_of(session, "stale_device")
    assert detail["flags_raised"] == [flag.id]
    assert (flag.status, flag.shift_id) == (FlagStatus.OPEN, second.id)
    assert flag.evidence["shift_id"] == second.id


def test_a_resolved_stale_device_flag_opens_again_when_the_device_falls_silent_again(
    session: Session, world: World, pda: Pda
) -> None:
    """The manager resolved one silence; the device pushed, then went silent again
    hours later in the same shift: that is a new silence, and the station must see it."""
    [tn] = [factories.parcel(session, world.station).tracking_no]
    pda.open()
    sweep(session, sweeps.stale_device, OPENED + minutes(50))
    [flag] = flags_of(session, "stale_device")
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="dead zone")
    session.commit()

    back = OPENED + minutes(60)
    pda.push([pda.event(tn)], at=back)
    assert sweep(session, sweeps.stale_device, back + minutes(5))["stale_devices"] == []
    assert flags_of(session, "stale_device")[0].status == FlagStatus.RESOLVED

    detail = sweep(session, sweeps.stale_device, back + minutes(120))

    [flag] = flags_of(session, "stale_device")
    assert detail["flags_raised"] == [flag.id]
    assert flag.status == FlagStatus.OPEN
    assert flag.evidence["last_push_at"] == back.isoformat()
    again = sweep(session, sweeps.stale_device, back + minutes(125))  # the same silence
    assert again["flags_raised"] == [] and flags_of(session, "stale_device")[0].status == (
        FlagStatus.OPEN
    )


# -- blob_missing_at_handover ---------------------------------------------------------------------


def test_images_still_missing_after_the_handover_are_flagged_until_they_arrive(
    session: Session, world: World, pda: Pda
) -> None:
    signature, signature_bytes = image((10, 10, 10))
    photo, photo_bytes = image((200, 10, 10))
    a, b = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b)], at=OPENED + minutes(5))
    pod = {"recipient_name": "Wang", "signature_sha256": signature, "photo_sha256": photo}
    pda.push(
        [pda.event(a, "delivered", pod=pod), pda.event(b, "returned_to_station")],
        at=OPENED + minutes(30),
    )
    closed_at = NOW
    pda.close(shift, at=closed_at)
    delivery = session.scalar(select(ScanEvent.id).where(ScanEvent.type == "delivered"))

    early = sweep(session, sweeps.blob_missing_at_handover, closed_at + minutes(59))
    assert early["shifts_checked"] == 0 and flags_of(session, "blob_missing_at_handover") == []

    raised = sweep(session, sweeps.blob_missing_at_handover, closed_at + minutes(61))

    [flag] = flags_of(session, "blob_missing_at_handover")
    assert raised == {
        "shifts_checked": 1,
        "missing_blobs": 2,
        "flags_raised": [flag.id],
        "flags_closed": [],
    }
    assert (flag.subject_type, flag.subject_key, flag.shift_id) == (
        "shift",
        str(shift.id),
        shift.id,
    )
    assert flag.evidence == {"blobs": sorted([signature, photo]), "event_ids": [delivery]}
    history = changes(session)

    again = sweep(session, sweeps.blob_missing_at_handover, closed_at + minutes(62))
    assert again["flags_raised"] == [] and changes(session) == history

    record_blob(session, signature, signature_bytes)
    half = sweep(session, sweeps.blob_missing_at_handover, closed_at + minutes(70))
    [flag] = flags_of(session, "blob_missing_at_handover")
    assert half["missing_blobs"] == 1
    assert flag.status == FlagStatus.OPEN and flag.evidence["blobs"] == [photo]

    record_blob(session, photo, photo_bytes)
    done = sweep(session, sweeps.blob_missing_at_handover, closed_at + minutes(80))

    [flag] = flags_of(session, "blob_missing_at_handover")
    assert done["flags_closed"] == [flag.id] and done["missing_blobs"] == 0
    assert flag.status == FlagStatus.CLOSED
    assert flag.closed_reason == "every proof image named by the shift's deliveries has arrived"
    history = changes(session)
    sweep(session, sweeps.blob_missing_at_handover, closed_at + minutes(90))
    assert changes(session) == history


def test_images_of_a_voided_delivery_and_of_old_handovers_are_not_asked_for(
    session: Session, world: World, pda: Pda
) -> None:
    photo, _ = image((1, 2, 3))
    [tn] = [factories.parcel(session, world.station).tracking_no]
    shift = pda.open()
    pod = {"recipient_name": "Li", "signature_sha256": photo}
    mistake = pda.event(tn, "delivered", pod=pod)
    correction = pda.event(
        tn, "correction", voids_client_event_id=mistake["client_event_id"], reason="mis-tap"
    )
    pda.push([pda.event(tn), mistake, correction], at=OPENED + minutes(30))
    pda.close(shift, at=NOW)

    detail = sweep(session, sweeps.blob_missing_at_handover, NOW + minutes(61))
    assert (detail["shifts_checked"], detail["missing_blobs"]) == (1, 0)

    old = sweep(session, sweeps.blob_missing_at_handover, NOW + dt.timedelta(days=15))
    assert old["shifts_checked"] == 0


def test_images_of_a_delivery_pushed_after_the_handover_get_their_grace_too(
    session: Session, world: World, pda: Pda
) -> None:
    """The PDA was offline at the handover: its last delivery arrives hours after the
    close, and its photo is not missing until the grace has passed since then."""
    photo, _ = image((30, 60, 90))
    [tn] = [factories.parcel(session, world.station).tracking_no]
    shift = pda.open()
    pda.push([pda.event(tn)], at=OPENED + minutes(5))
    late = pda.event(tn, "delivered", pod={"recipient_name": "Zhao", "photo_sha256": photo})
    pda.close(shift, at=NOW)
    pushed = NOW + dt.timedelta(hours=3)
    pda.push([late], at=pushed)
    assert session.scalar(select(ScanEvent.shift_id).where(ScanEvent.type == "delivered")) == (
        shift.id
    )

    early = sweep(session, sweeps.blob_missing_at_handover, pushed + minutes(2))

    assert (early["shifts_checked"], early["missing_blobs"]) == (1, 0)
    assert flags_of(session, "blob_missing_at_handover") == []

    still = sweep(session, sweeps.blob_missing_at_handover, pushed + minutes(61))

    [flag] = flags_of(session, "blob_missing_at_handover")
    assert still["flags_raised"] == [flag.id] and flag.evidence["blobs"] == [photo]


def test_a_resolved_handover_flag_opens_again_when_another_image_goes_missing(
    session: Session, world: World, pda: Pda
) -> None:
    """The manager resolved the flag on the signature they knew was missing; a delivery
    pushed hours later names a photo that never comes. The resolution did not see it:
    the flag is open again, and the sweep says it raised it."""
    signature, _ = image((11, 22, 33))
    photo, _ = image((44, 55, 66))
    a, b = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b)], at=OPENED + minutes(5))
    pda.push(
        [pda.event(a, "delivered", pod={"recipient_name": "Wang", "signature_sha256": signature})],
        at=OPENED + minutes(30),
    )
    late = pda.event(b, "delivered", pod={"recipient_name": "Zhao", "photo_sha256": photo})
    pda.close(shift, at=NOW)
    sweep(session, sweeps.blob_missing_at_handover, NOW + minutes(61))
    [flag] = flags_of(session, "blob_missing_at_handover")
    resolve_flag(session=session, flag=flag, user_id=world.manager.id, note="signed on paper")
    session.commit()
    again = sweep(session, sweeps.blob_missing_at_handover, NOW + minutes(90))
    assert flag.status == FlagStatus.RESOLVED and again["flags_raised"] == []  # what it saw
    pushed = NOW + dt.timedelta(hours=3)
    pda.push([late], at=pushed)

    detail = sweep(session, sweeps.blob_missing_at_handover, pushed + minutes(61))

    [flag] = flags_of(session, "blob_missing_at_handover")
    assert flag.evidence["blobs"] == sorted([signature, photo])
    assert flag.status == FlagStatus.OPEN
    assert detail["flags_raised"] == [flag.id]


def test_a_flag_on_a_handover_past_the_lookback_still_closes_when_its_images_arrive(
    session: Session, world: World, pda: Pda
) -> None:
    """Handovers older than the lookback are not searched for missing images any more,
    but a flag already raised on one is followed until its images arrive, however
    late: else it stays open, saying they are missing while they are there."""
    photo, photo_bytes = image((5, 50, 150))
    [tn] = [factories.parcel(session, world.station).tracking_no]
    shift = pda.open()
    delivered = pda.event(tn, "delivered", pod={"recipient_name": "Sun", "photo_sha256": photo})
    pda.push([pda.event(tn), delivered], at=OPENED + minutes(30))
    pda.close(shift, at=NOW)
    sweep(session, sweeps.blob_missing_at_handover, NOW + minutes(61))
    [flag] = flags_of(session, "blob_missing_at_handover")
    assert flag.status == FlagStatus.OPEN and flag.evidence["blobs"] == [photo]

    weeks_later = NOW + dt.timedelta(days=20)
    still = sweep(session, sweeps.blob_missing_at_handover, weeks_later)

    [flag] = flags_of(session, "blob_missing_at_handover")
    assert still["flags_closed"] == [] and flag.status == FlagStatus.OPEN

    record_blob(session, photo, photo_bytes, uploaded_at=weeks_later)
    done = sweep(session, sweeps.blob_missing_at_handover, weeks_later + minutes(15))

    [flag] = flags_of(session, "blob_missing_at_handover")
    assert done["flags_closed"] == [flag.id] and flag.status == FlagStatus.CLOSED


def record_blob(
    session: Session,
    digest: str,
    data: bytes,
    *,
    uploaded_at: dt.datetime = NOW,
    store: FileBlobStore | None = None,
) -> Blob:
    """An uploaded image: its row (and its bytes, given a store)."""
    blob = Blob(
        sha256=digest,
        media_type="image/png",
        size_bytes=len(data),
        width=4,
        height=4,
        uploaded_at=uploaded_at,
    )
    session.add(blob)
    if store is not None:
        store.put(digest, data)
    session.commit()
    return blob


# -- consent_expiry -------------------------------------------------------------------------------


def consent_feed(session: Session, world: World, tracking_no: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(FeedChange)
            .where(
                FeedChange.kind == FeedKind.CONSENT,
                FeedChange.courier_id == world.courier.id,
                FeedChange.tracking_no == tracking_no,
            )
        )
        or 0
    )


def parcel_consent(session: Session, tracking_no: str, expires_at: dt.datetime | None) -> Consent:
    consent = grant(
        session=session,
        draft=ConsentDraft(
            scope=ConsentScope.PARCEL,
            method=ConsentMethod.LOCKER,
            channel=ConsentChannel.SMS,
            granted_at=NOW - dt.timedelta(hours=2),
            tracking_no=tracking_no,
            expires_at=expires_at,
        ),
        rules=ConsentRules(tracking=TRACKING, phone_region="CN"),
        created_by=None,
        now=NOW,
    )
    session.commit()
    return consent


def test_an_expired_consent_is_announced_once_to_the_courier_holding_the_parcel(
    session: Session, world: World, pda: Pda
) -> None:
    [tn, other] = [factories.parcel(session, world.station).tracking_no for _ in range(2)]
    pda.open()
    pda.push([pda.event(tn), pda.event(other)], at=OPENED + minutes(5))
    holder = session.scalar(select(Parcel.courier_id).where(Parcel.tracking_no == tn))
    assert holder == world.courier.id
    expires = NOW + dt.timedelta(hours=1)
    consent = parcel_consent(session, tn, expires)
    lasting = parcel_consent(session, other, None)
    before = consent_feed(session, world, tn)

    early = sweep(session, sweeps.consent_expiry, expires - minutes(1))
    assert early == {"announced": 0, "parcels_rejudged": 0, "consent_ids": []}

    later = expires + minutes(3)
    detail = sweep(session, sweeps.consent_expiry, later)

    assert detail == {"announced": 1, "parcels_rejudged": 1, "consent_ids": [consent.id]}
    assert consent_feed(session, world, tn) == before + 1
    session.expire_all()
    assert session.get(Consent, consent.id).expiry_announced_at == later
    assert session.get(Consent, lasting.id).expiry_announced_at is None

    again = sweep(session, sweeps.consent_expiry, later + minutes(5))
    assert again["announced"] == 0
    assert consent_feed(session, world, tn) == before + 1


def test_a_consent_revoked_before_it_expired_is_marked_without_a_second_announcement(
    session: Session, world: World, pda: Pda
) -> None:
    [tn] = [factories.parcel(session, world.station).tracking_no]
    pda.open()
    pda.push([pda.event(tn)], at=OPENED + minutes(5))
    consent = parcel_consent(session, tn, NOW + minutes(30))
    # Revoked (through the API, which announced it then) before it would have expired.
    consent.revoked_at, consent.revoked_reason = NOW, "changed their mind"
    session.commit()
    before = consent_feed(session, world, tn)

    detail = sweep(session, sweeps.consent_expiry, NOW + minutes(31))

    assert detail == {"announced": 1, "parcels_rejudged": 0, "consent_ids": [consent.id]}
    assert consent_feed(session, world, tn) == before
    session.expire_all()
    assert session.get(Consent, consent.id).expiry_announced_at == NOW + minutes(31)


# -- proof_retention_purge ------------------------------------------------------------------------

YEAR_AGO = NOW - dt.timedelta(days=365)


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def purge_entries(session: Session) -> list[AuditEntry]:
    return list(
        session.scalars(
            select(AuditEntry)
            .where(AuditEntry.action == "proof_images_purged")
            .order_by(AuditEntry.id)
        )
    )


def old_images(
    session: Session, store: FileBlobStore, count: int, *, start: dt.datetime
) -> list[str]:
    digests = []
    for n in range(count):
        digest, data = image((n, 100, 200))
        record_blob(session, digest, data, uploaded_at=start + minutes(n), store=store)
        digests.append(digest)
    return digests


def test_proof_images_past_retention_are_purged_with_an_audit_entry(
    session: Session, world: World, store: FileBlobStore
) -> None:
    old = old_images(session, store, 2, start=YEAR_AGO - dt.timedelta(days=30))
    recent_digest, recent_bytes = image((9, 9, 9))
    record_blob(
        session,
        recent_digest,
        recent_bytes,
        uploaded_at=YEAR_AGO + dt.timedelta(days=1),
        store=store,
    )

    detail = sweep(session, sweeps.proof_retention_purge, NOW, blob_store=store)

    [entry] = purge_entries(session)
    assert detail == {
        "cutoff": YEAR_AGO.isoformat(),
        "purged": 2,
        "files_deleted": 2,
        "leftover_files_deleted": 0,
        "audit_entries": [entry.id],
        "through": {
            "uploaded_at": (YEAR_AGO - dt.timedelta(days=30) + minutes(1)).isoformat(),
            "sha256": old[1],
        },
    }
    assert [store.exists(d) for d in (*old, recent_digest)] == [False, False, True]
    session.expire_all()
    assert [session.get(Blob, d).purged_at for d in (*old, recent_digest)] == [NOW, NOW, None]
    assert (entry.actor_id, entry.subject_type, entry.subject_key) == (None, "blob", old[0])
    assert entry.details == {
        "count": 2,
        "digests": old,
        "cutoff": YEAR_AGO.isoformat(),
        "retention_days": 365,
    }
    assert audit.verify(session=session).ok

    again = sweep(session, sweeps.proof_retention_purge, NOW + minutes(5), blob_store=store)

    assert (again["purged"], again["files_deleted"], again["audit_entries"]) == (0, 0, [])
    assert len(purge_entries(session)) == 1
    assert store.exists(recent_digest)

    store.put(old[0], b"left behind by a crash")
    converged = sweep(session, sweeps.proof_retention_purge, NOW + minutes(10), blob_store=store)

    assert converged["leftover_files_deleted"] == 1 and converged["purged"] == 0
    assert not store.exists(old[0])
    assert len(purge_entries(session)) == 1
    assert audit.verify(session=session).ok


def test_a_new_proof_naming_a_purged_image_is_asked_for_again(
    session: Session, world: World, pda: Pda, store: FileBlobStore
) -> None:
    """The purge deleted an old image's bytes and kept its row. A new delivery names
    the same image and its PDA does not upload it again: the proof has no image (410
    ``blob_purged``), so the push flags ``pod_blob_missing`` and the handover sweep
    ``blob_missing_at_handover``, as for an image never uploaded."""
    photo, data = image((7, 77, 177))
    record_blob(session, photo, data, uploaded_at=NOW - dt.timedelta(days=800), store=store)
    purge = sweep(
        session, sweeps.proof_retention_purge, OPENED - dt.timedelta(days=1), blob_store=store
    )
    assert purge["purged"] == 1 and not store.exists(photo)

    a = factories.parcel(session, world.station).tracking_no
    shift = pda.open()
    pda.push([pda.event(a)], at=OPENED + minutes(5))
    pod = {"recipient_name": "Wang", "photo_sha256": photo}
    pda.push([pda.event(a, "delivered", pod=pod)], at=OPENED + minutes(30))
    pda.close(shift, at=NOW)
    assert [f.evidence["blobs"] for f in flags_of(session, "pod_blob_missing")] == [[photo]]

    detail = sweep(session, sweeps.blob_missing_at_handover, NOW + minutes(61))

    assert detail["missing_blobs"] == 1, detail
    [flag] = flags_of(session, "blob_missing_at_handover")
    assert flag.evidence["blobs"] == [photo]


def test_a_purge_is_in_the_history_of_the_parcels_whose_proofs_named_its_images(
    session: Session, world: World, pda: Pda, store: FileBlobStore
) -> None:
    """An auditor settles a dispute about parcel a a year on: its proof's photo is
    gone. ``GET /audit?tracking_no=a`` did not list the purge that deleted it (the
    entry named digests, no parcel), so the history did not say when or why. The
    purge is filed under the parcels whose proofs name its images (a's, not b's)."""
    a, b = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    photo, data = image((3, 33, 133))
    record_blob(session, photo, data, uploaded_at=OPENED + minutes(20), store=store)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b)], at=OPENED + minutes(5))
    pod = {"recipient_name": "Wang", "photo_sha256": photo}
    pda.push([pda.event(a, "delivered", pod=pod)], at=OPENED + minutes(30))
    pda.close(shift, at=NOW)

    purge = sweep(
        session,
        sweeps.proof_retention_purge,
        OPENED + dt.timedelta(days=400),
        blob_store=store,
    )

    assert purge["purged"] == 1
    [entry] = purge_entries(session)

    def listed(number: str) -> list[int]:
        return [e.id for e in audit.list_entries(session=session, tracking_no=number)]

    assert entry.id in listed(a)
    assert entry.id not in listed(b)
    assert audit.verify(session=session).ok


def test_a_purge_is_in_the_history_of_the_parcels_whose_rejected_events_named_its_images(
    session: Session, world: World, pda: Pda, store: FileBlobStore
) -> None:
    """Parcel a's drop into a locker was sent without its locker and refused (kept in
    quarantine), its photo uploaded: an auditor's read of that photo is filed under a,
    and so is the purge that deleted it, so that a's history says when and why the only
    picture of the drop went. Not b's."""
    a, b = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    photo, data = image((4, 44, 144))
    record_blob(session, photo, data, uploaded_at=OPENED + minutes(20), store=store)
    shift = pda.open()
    pda.push([pda.event(a), pda.event(b)], at=OPENED + minutes(5))
    refused = pda.event(a, "delivered_to_locker", pod={"photo_sha256": photo})
    receipt = pda.push([refused], at=OPENED + minutes(30))
    assert [r["status"] for r in receipt["results"]] == ["rejected"], receipt
    pda.close(shift, at=NOW)

    purge = sweep(
        session, sweeps.proof_retention_purge, OPENED + dt.timedelta(days=400), blob_store=store
    )

    assert purge["purged"] == 1
    [entry] = purge_entries(session)

    def listed(number: str) -> list[int]:
        return [e.id for e in audit.list_entries(session=session, tracking_no=number)]

    assert entry.id in listed(a)
    assert entry.id not in listed(b)


def test_purging_writes_one_audit_entry_per_batch(
    session: Session, world: World, store: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeps, "PURGE_BATCH", 2)
    old = old_images(session, store, 5, start=YEAR_AGO - dt.timedelta(days=2))

    detail = sweep(session, sweeps.proof_retention_purge, NOW, blob_store=store)

    entries = purge_entries(session)
    assert detail["purged"] == 5 and detail["audit_entries"] == [e.id for e in entries]
    assert [e.details["digests"] for e in entries] == [old[0:2], old[2:4], old[4:]]
    assert [e.details["count"] for e in entries] == [2, 2, 1]
    assert not any(store.exists(d) for d in old)
    assert audit.verify(session=session).ok


class FlakyStore(FileBlobStore):
    """Deleting fails once: the process died between the commit and the deletion."""

    failed = False

    def delete(self, digest: str) -> bool:
        if not self.failed:
            self.failed = True
            raise OSError("disk went away")
        return super().delete(digest)


def test_a_purge_interrupted_after_its_commit_is_finished_by_the_next_run(
    session: Session, world: World, connection: Connection, tmp_path: Path
) -> None:
    store = FlakyStore(tmp_path / "blobs")
    old = old_images(session, store, 3, start=YEAR_AGO - dt.timedelta(days=2))
    sessions = sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )
    settings = SweepSettings(blob_store=store)
    job = Job(
        sweeps.PROOF_RETENTION_PURGE,
        "purge",
        dt.timedelta(days=1),
        lambda *, session, now: sweeps.proof_retention_purge(
            session=session, now=now, settings=settings
        ),
    )

    def run(now: dt.datetime) -> Any:
        return run_job(
            sessions=sessions, job=job, holder="test", now=now, lease_seconds=60, force=True
        )

    crashed = run(NOW)
    assert crashed.outcome == "failed" and crashed.error == "OSError: disk went away"
    session.expire_all()
    assert all(session.get(Blob, d).purged_at == NOW for d in old)  # committed, on record
    assert all(store.exists(d) for d in old)  # but the bytes are still there
    assert len(purge_entries(session)) == 1

    finished = run(NOW + dt.timedelta(days=1))

    assert finished.outcome == "ok"
    assert (finished.detail["purged"], finished.detail["leftover_files_deleted"]) == (0, 3)
    assert not any(store.exists(d) for d in old)
    assert finished.detail["through"]["sha256"] == old[-1]

    store.put(old[0], b"behind the last successful run: not looked at again")
    quiet = run(NOW + dt.timedelta(days=2))
    assert quiet.outcome == "ok" and quiet.detail["leftover_files_deleted"] == 0
    assert quiet.detail["through"] == finished.detail["through"]


def upload(
    session: Session,
    store: FileBlobStore,
    digest: str,
    data: bytes,
    station_id: int,
    courier_id: int,
) -> None:
    """A courier's PDA uploads an image (``PUT /blobs/<sha256>``), not committed."""
    store_blob(
        session=session,
        store=store,
        digest=digest,
        data=data,
        max_bytes=1 << 20,
        station_id=station_id,
        uploaded_by=courier_id,
    )


def test_an_image_uploaded_again_as_its_purge_is_put_on_record_keeps_its_bytes(
    session: Session, world: World, connection: Connection, store: FileBlobStore
) -> None:
    """A new proof names an old image and its PDA uploads it just after the purge
    committed that image's purge and before it deleted the bytes: the upload brings
    the image back (its row says present, its retention starts over), so its bytes
    must stay; else the row says present and the file is gone for good."""
    [old] = old_images(session, store, 1, start=YEAR_AGO - dt.timedelta(days=2))
    data = image((0, 100, 200))[1]
    uploads = sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )

    def upload_again(_purging: Session) -> None:
        with uploads() as uploading:
            upload(uploading, store, old, data, world.station.id, world.courier.id)
            uploading.commit()

    event.listen(session, "after_commit", upload_again, once=True)

    detail = sweep(session, sweeps.proof_retention_purge, NOW, blob_store=store)

    session.expire_all()
    assert session.get(Blob, old).purged_at is None
    assert store.exists(old) and store.read(old, size=len(data)) == data
    assert (detail["purged"], detail["files_deleted"]) == (1, 0)


def test_a_shift_not_closed_flag_of_a_shift_closed_some_other_way_is_closed(
    session: Session, world: World
) -> None:
    """The safety net: whatever closed the shift, the next sweep closes its flag."""
    shift = shifts.open_shift(
        session=session,
        device=world.device,
        courier_id=world.courier.id,
        rules=ShiftRules(),
        now=OPENED,
    )
    session.commit()
    late = shift.planned_end_at + minutes(31)
    sweeps.shift_not_closed(session=session, now=late, settings=SETTINGS)
    shift.status = shifts.ShiftStatus.CLOSED  # e.g. a close that raced the sweep
    session.commit()
    result = sweeps.shift_not_closed(session=session, now=late + minutes(5), settings=SETTINGS)
    session.commit()
    [flag] = flags_of(session, "shift_not_closed")
    assert result["flags_closed"] == [flag.id]
    assert (flag.status, flag.closed_reason) == (FlagStatus.CLOSED, "the shift is no longer open")


@pytest.mark.postgres_only
def test_the_sweep_waits_for_a_close_in_progress_and_flags_nothing(committed_app: Any) -> None:
    """A close holds the shift's lock while the sweep looks at it: the sweep must see it
    closed once the close commits, not flag it from a stale read."""
    import threading
    import time

    from courier_api.extensions import db

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        station = factories.station(setup, code="RACE")
        courier = factories.user(setup, "racer", "courier", station)
        device = factories.device(setup, "PDA-RACE", station)
        shift = shifts.open_shift(
            session=setup, device=device, courier_id=courier.id, rules=ShiftRules(), now=OPENED
        )
        setup.commit()
        shift_id, courier_id = shift.id, courier.id
    late = shift.planned_end_at + minutes(31)
    locked = threading.Event()

    def close() -> None:
        with sessions() as closing:
            shifts.close_shift(
                session=closing,
                shift=closing.get(Shift, shift_id),
                closed_by=courier_id,
                now=late,
            )
            locked.set()
            time.sleep(0.5)  # the sweep runs meanwhile
            closing.commit()

    closer = threading.Thread(target=close)
    closer.start()
    locked.wait(timeout=10)
    with sessions() as sweeping:
        result = sweeps.shift_not_closed(session=sweeping, now=late, settings=SETTINGS)
        sweeping.commit()
    closer.join(timeout=30)
    assert result["overdue_shifts"] == 0
    with sessions() as check:
        assert check.scalars(select(Flag).where(Flag.kind == "shift_not_closed")).all() == []


@pytest.mark.postgres_only
def test_a_purge_waits_for_an_upload_of_the_same_image_and_leaves_its_bytes(
    committed_app: Any, store: FileBlobStore
) -> None:
    """PostgreSQL, two connections: a PDA uploads an image again just after the purge
    put its purge on record, and holds the image's row while it writes the bytes. The
    purge's deletion waits for that row, then finds the image no longer purged and
    leaves its bytes (``sync.sweeps._delete_purged_bytes``, ``sync.blobs``' row lock)."""
    import threading
    import time

    from courier_api.extensions import db

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        station = factories.station(setup, code="PURGE")
        courier = factories.user(setup, "uploader", "courier", station)
        setup.commit()
        station_id, courier_id = station.id, courier.id
        [old] = old_images(setup, store, 1, start=YEAR_AGO - dt.timedelta(days=2))
    data = image((0, 100, 200))[1]
    written = threading.Event()
    failures: list[BaseException] = []

    def upload_again() -> None:
        try:
            with sessions() as uploading:
                upload(uploading, store, old, data, station_id, courier_id)
                uploading.flush()
                written.set()  # row locked, bytes written, not yet committed
                time.sleep(0.3)  # the purge's deletion runs meanwhile
                uploading.commit()
        except BaseException as error:  # seen by the test, not lost in the thread
            failures.append(error)
            written.set()

    uploader = threading.Thread(target=upload_again)

    def start_upload(_purging: Session) -> None:
        uploader.start()
        assert written.wait(10)

    with sessions() as purging:
        event.listen(purging, "after_commit", start_upload, once=True)
        detail = sweep(purging, sweeps.proof_retention_purge, NOW, blob_store=store)
    uploader.join(timeout=30)
    assert failures == []
    with sessions() as check:
        blob = check.get(Blob, old)
        assert blob is not None and blob.purged_at is None
    assert store.exists(old) and store.read(old, size=len(data)) == data
    assert (detail["purged"], detail["files_deleted"]) == (1, 0)
