"""A station's day built through the engine, for the page tests (with and without a browser).

Yesterday at station PDG (Asia/Shanghai), four couriers:

* Li Wei (PDA-PDG-01): a **balanced** shift. Deliveries with signature and photo,
  a locker drop after a consent captured on the PDA, a failed attempt returned, a
  pickup-point drop of a class that needs no consent.
* Zhang Min (PDA-PDG-02, clock four minutes fast): an **unbalanced** shift. A parcel
  checked out and never accounted for (``missing_at_handover``), an express parcel
  left in a locker without consent (``unauthorized_locker_drop``), a delivery whose
  photo was never uploaded.
* Wang Qiang (PDA-PDG-03): a **provisional** shift: seq 4 never reached the server.
* Chen Lu (PDA-PDG-04): still out (open).

Before it, six ordinary days (a shift each for Li Wei and Zhang Min) for the daily
report's 7-day chart. Another station (MHG) has a manager and a shift of its own, for
access tests. Staff: ``admin``, ``manager`` (Wang Fang), ``manager.mhg``, ``auditor``
(Chen Jing), ``recipient-app`` (integration); every password is ``factories.PASSWORD``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from PIL import Image, ImageDraw
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Device, Flag, ScanEvent, ServiceClass, Shift, Station, User
from sync import shifts
from sync.blobs import FileBlobStore, store_blob
from sync.events import EventRules
from sync.ingest import IngestRules, PushBatch, Pusher, ingest
from sync.rules import Policy
from sync.shifts import ShiftRules
from sync.status import rejudge_after_upload
from sync.tracking import DEFAULT_DOMESTIC_PATTERNS, TrackingNumberPolicy
from tests import factories

TIMEZONE = "Asia/Shanghai"
RULES = IngestRules(
    events=EventRules(tracking=TrackingNumberPolicy.from_patterns(DEFAULT_DOMESTIC_PATTERNS))
)
POLICY = Policy()
HOME = (31.2231, 121.5440)  # Pudong
HISTORY_DAYS = 6


@dataclass
class StationDay:
    day: dt.date
    station: Station
    other_station: Station
    admin: User
    manager: User
    other_manager: User
    auditor: User
    integration: User
    couriers: dict[str, User]
    balanced: Shift
    unbalanced: Shift
    provisional: Shift
    open: Shift
    other_shift: Shift
    missing_parcel: str
    dropped_parcel: str  # the express parcel left in a locker without consent
    drop_event_id: int
    authorized_drop_event_id: int
    uploaded: list[str] = field(default_factory=list)  # image digests stored
    not_uploaded: str = ""  # a digest a POD names and the PDA never sent

    def flag(self, session: Session, kind: str, *, subject_key: str | None = None) -> Flag:
        query = select(Flag).where(Flag.kind == kind, Flag.station_id == self.station.id)
        if subject_key is not None:
            query = query.where(Flag.subject_key == subject_key)
        return session.scalars(query).one()


def local(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
    """A wall-clock time of the station's day, in UTC."""
    return dt.datetime.combine(day, dt.time(hour, minute), tzinfo=ZoneInfo(TIMEZONE)).astimezone(
        dt.UTC
    )


def yesterday_at_station(now: dt.datetime | None = None) -> dt.date:
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(ZoneInfo(TIMEZONE)).date() - dt.timedelta(days=1)


def signature_png(seed: int) -> bytes:
    """A signature-like scribble: a real PNG, different for each seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (320, 160), "white")
    draw = ImageDraw.Draw(image)
    x, y = 20, 90
    points = [(x, y)]
    for _ in range(18):
        x += rng.randint(8, 18)
        y = max(30, min(140, y + rng.randint(-40, 40)))
        points.append((x, y))
    draw.line(points, fill=(20, 40, 120), width=4, joint="curve")
    draw.line([(20, 140), (300, 140)], fill=(180, 180, 180), width=1)
    return _png(image)


def doorstep_png(seed: int) -> bytes:
    """A 'photo': a door, a parcel, a number; a real PNG, different for each seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", (320, 240), (rng.randint(150, 210), 190, 170))
    draw = ImageDraw.Draw(image)
    draw.rectangle([110, 30, 210, 230], fill=(120, 80, 50), outline=(60, 40, 20), width=3)
    draw.ellipse([190, 125, 200, 135], fill=(230, 200, 80))
    left = rng.randint(30, 60)
    draw.rectangle([left, 170, left + 70, 230], fill=(200, 160, 100), outline=(90, 60, 30))
    draw.text((230, 20), str(100 + seed % 900), fill=(30, 30, 30))
    return _png(image)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Pda:
    """One courier's PDA: numbers its events, pushes them through the engine."""

    def __init__(
        self,
        session: Session,
        device: Device,
        courier: User,
        *,
        clock_ahead: dt.timedelta = dt.timedelta(0),
    ) -> None:
        self.session = session
        self.device = device
        self.courier = courier
        self.pusher = Pusher(device.id, device.station_id, courier.id)
        self.clock_ahead = clock_ahead
        self.seq = 0

    def open(self, at: dt.datetime) -> Shift:
        shift = shifts.open_shift(
            session=self.session,
            device=self.device,
            courier_id=self.courier.id,
            rules=ShiftRules(),
            first_seq=self.seq + 1,
            now=at,
        )
        self.session.commit()
        return shift

    def event(self, at: dt.datetime, tracking_no: str, type: str, **fields: Any) -> dict:
        """An event at the true time ``at``, stamped by the PDA's own clock."""
        self.seq += 1
        return factories.event(
            self.seq, tracking_no, type, occurred_at=at + self.clock_ahead, **fields
        )

    def push(self, events: list[dict], at: dt.datetime) -> dict[str, Any]:
        receipt = ingest(
            session=self.session,
            batch=PushBatch(self.device.id, uuid.uuid4(), at + self.clock_ahead, events),
            pusher=self.pusher,
            rules=RULES,
            received_at=at,
        )
        self.session.commit()
        return receipt

    def close(self, shift: Shift, at: dt.datetime, *, last_seq: int | None = None) -> Shift:
        closed = shifts.close_shift(
            session=self.session,
            shift=shift,
            closed_by=self.courier.id,
            last_seq=self.seq if last_seq is None else last_seq,
            now=at,
        )
        self.session.commit()
        return closed


@dataclass(frozen=True)
class MisSorted:
    shift: Shift  # MHG's, where the drop is filed
    tracking_no: str  # a PDG parcel
    drop_id: int


def mis_sorted_drop(session: Session, day: StationDay) -> MisSorted:
    """A PDG parcel that Zhao Lei of MHG checks out and leaves in a locker at 18:30 of
    the day (mis-sorted): the drop is PDG's proof, filed under MHG's shift."""
    zhao = session.scalars(select(User).where(User.username == "zhaolei")).one()
    device = session.get(Device, "PDA-MHG-05")
    assert device is not None
    pda = Pda(session, device, zhao)
    pda.seq = 10  # after the day's own events
    parcel = factories.parcel(session, day.station)
    session.commit()
    shift = pda.open(local(day.day, 18, 0))
    checkout = pda.event(local(day.day, 18, 5), parcel.tracking_no, "checked_out")
    drop = pda.event(
        local(day.day, 18, 30),
        parcel.tracking_no,
        "delivered_to_locker",
        locker_id="HIVE-MHG-2",
        compartment="C3",
        pod={"pickup_code": "551177"},
    )
    pda.push([checkout, drop], local(day.day, 18, 40))
    pda.close(shift, local(day.day, 19, 0))
    drop_id = session.scalars(
        select(ScanEvent.id).where(
            ScanEvent.tracking_no == parcel.tracking_no, ScanEvent.type == "delivered_to_locker"
        )
    ).one()
    return MisSorted(shift, parcel.tracking_no, drop_id)


def near(step: int) -> dict[str, float]:
    """A GPS fix a few hundred metres around the station's district."""
    return {
        "lat": round(HOME[0] + 0.001 * (step % 7), 6),
        "lon": round(HOME[1] + 0.0012 * (step % 5), 6),
        "accuracy_m": 8.0 + step % 4,
    }


def _ordinary_shift(
    pda: Pda, day: dt.date, numbers: list[str], signature: str, *, missing: bool
) -> None:
    """A closed shift of an earlier day: all delivered with a signature, the last one
    returned (or, when ``missing``, never accounted for)."""
    shift = pda.open(local(day, 8, 30))
    events = [pda.event(local(day, 8, 35), tn, "checked_out") for tn in numbers]
    for n, tn in enumerate(numbers[:-1]):
        pod = {"recipient_name": "Liu Yang", "signature_sha256": signature}
        events.append(pda.event(local(day, 10, 5 * n), tn, "delivered", pod=pod))
    if not missing:
        events.append(pda.event(local(day, 16, 0), numbers[-1], "returned_to_station"))
    pda.push(events, local(day, 17, 0))
    pda.close(shift, local(day, 17, 30))


def build(
    session: Session,
    blob_dir: str | Path,
    *,
    day: dt.date | None = None,
    history_days: int = HISTORY_DAYS,
) -> StationDay:
    """The day above, committed through ``session`` (savepoints inside a test's
    transaction, or real commits for the browser's server), after ``history_days``
    ordinary days (a shift each for Li Wei and Zhang Min) for the report's chart."""
    day = day or yesterday_at_station()
    store = FileBlobStore(blob_dir)
    station = factories.station(session, code="PDG", name="Pudong Gaoqiao")
    other = factories.station(session, code="MHG", name="Minhang Gumei")
    people = {
        "admin": factories.user(session, "admin", "admin"),
        "manager": factories.user(session, "manager", "station_manager", station),
        "other_manager": factories.user(session, "manager.mhg", "station_manager", other),
        "auditor": factories.user(session, "auditor", "auditor"),
        "integration": factories.user(session, "recipient-app", "integration"),
    }
    names = {
        "liwei": "Li Wei",
        "zhangmin": "Zhang Min",
        "wangqiang": "Wang Qiang",
        "chenlu": "Chen Lu",
        "zhaolei": "Zhao Lei",
    }
    couriers = {
        username: factories.user(
            session, username, "courier", other if username == "zhaolei" else station
        )
        for username in names
    }
    for username, full_name in names.items():
        couriers[username].full_name = full_name
    people["manager"].full_name = "Wang Fang"
    people["auditor"].full_name = "Chen Jing"
    devices = {
        username: factories.device(
            session,
            f"PDA-{'MHG' if username == 'zhaolei' else 'PDG'}-0{n}",
            other if username == "zhaolei" else station,
        )
        for n, username in enumerate(names, start=1)
    }
    session.commit()

    def parcels(n: int, service_class: ServiceClass = ServiceClass.EXPRESS) -> list[str]:
        made = []
        for _ in range(n):
            parcel = factories.parcel(session, station, service_class=service_class)
            parcel.recipient_name = random.Random(parcel.tracking_no).choice(
                ("Liu Yang", "Sun Hui", "Zhou Ting", "Xu Jie", "Ma Lin", "Hu Bo", "Guo Mei")
            )
            made.append(parcel.tracking_no)
        session.commit()
        return made

    uploaded: list[str] = []

    def image(data: bytes, uploader: User) -> str:
        digest = hashlib.sha256(data).hexdigest()
        store_blob(
            session=session,
            store=store,
            digest=digest,
            data=data,
            max_bytes=8 * 1024 * 1024,
            station_id=uploader.station_id,
            uploaded_by=uploader.id,
        )
        rejudge_after_upload(session=session, digest=digest, policy=POLICY)
        session.commit()
        uploaded.append(digest)
        return digest

    # The week before: one shift a day (Li Wei, then Zhang Min), for the report's chart.
    liwei = Pda(session, devices["liwei"], couriers["liwei"])
    zhang = Pda(
        session, devices["zhangmin"], couriers["zhangmin"], clock_ahead=dt.timedelta(minutes=4)
    )
    sig1 = image(signature_png(1), couriers["liwei"])
    for back in range(history_days, 0, -1):
        earlier = day - dt.timedelta(days=back)
        for pda in (liwei, zhang):
            _ordinary_shift(pda, earlier, parcels(3 + back % 4), sig1, missing=back == 4)

    # Li Wei: everything accounted for.
    a = parcels(4)
    (a5,) = parcels(1, ServiceClass.PARCEL)
    balanced = liwei.open(local(day, 8, 0))
    photo1 = image(doorstep_png(1), couriers["liwei"])
    sig4 = image(signature_png(4), couriers["liwei"])
    liwei.push(
        [liwei.event(local(day, 8, 5 + i), tn, "checked_out") for i, tn in enumerate([*a, a5])],
        local(day, 8, 15),
    )
    consent = {"method": "locker", "channel": "in_person", "evidence": "asked at the door"}
    liwei_events = [
        liwei.event(local(day, 9, 2), a[0], "out_for_delivery", location=near(1)),
        liwei.event(
            local(day, 9, 14),
            a[0],
            "delivered",
            location=near(2),
            pod={
                "recipient_name": "Liu Yang",
                "relation": "self",
                "signature_sha256": sig1,
                "photo_sha256": photo1,
            },
        ),
        liwei.event(
            local(day, 10, 1), a[1], "consent_captured", consent=consent, location=near(3)
        ),
        liwei.event(
            local(day, 10, 3),
            a[1],
            "delivered_to_locker",
            locker_id="HIVE-PDG-17",
            compartment="B12",
            location=near(3),
            pod={"pickup_code": "482913"},
        ),
        liwei.event(
            local(day, 11, 20),
            a[2],
            "delivery_attempt_failed",
            reason="recipient_absent",
            action="retry_planned",
            location=near(4),
        ),
        liwei.event(
            local(day, 12, 5),
            a[3],
            "delivered",
            location=near(5),
            pod={"recipient_name": "Sun Hui", "relation": "neighbour", "signature_sha256": sig4},
        ),
        liwei.event(
            local(day, 13, 40),
            a5,
            "delivered_to_pickup_point",
            point_id="CAINIAO-0931",
            pod={"pickup_code": "0931-2207"},
            location=near(6),
        ),
        liwei.event(local(day, 16, 50), a[2], "returned_to_station"),
    ]
    liwei.push(liwei_events, local(day, 17, 0))
    balanced = liwei.close(balanced, local(day, 17, 5))
    authorized_drop = liwei_events[3]

    # Zhang Min: a parcel missing, an express parcel left without consent; clock fast.
    b = parcels(5)
    unbalanced = zhang.open(local(day, 8, 10))
    sig_b1 = image(signature_png(11), couriers["zhangmin"])
    photo_b1 = image(doorstep_png(11), couriers["zhangmin"])
    photo_b3 = image(doorstep_png(13), couriers["zhangmin"])
    sig_b4 = image(signature_png(14), couriers["zhangmin"])
    never_sent = hashlib.sha256(b"the photo that stayed on the PDA").hexdigest()
    zhang.push(
        [zhang.event(local(day, 8, 12 + i), tn, "checked_out") for i, tn in enumerate(b)],
        local(day, 8, 20),
    )
    zhang_events = [
        zhang.event(
            local(day, 9, 30),
            b[0],
            "delivered",
            location=near(7),
            pod={
                "recipient_name": "Zhou Ting",
                "relation": "self",
                "signature_sha256": sig_b1,
                "photo_sha256": photo_b1,
            },
        ),
        zhang.event(local(day, 10, 15), b[1], "out_for_delivery", location=near(8)),
        zhang.event(
            local(day, 11, 2),
            b[2],
            "delivered_to_locker",
            locker_id="HIVE-PDG-03",
            compartment="A07",
            location=near(9),
            pod={"photo_sha256": photo_b3, "pickup_code": "771205"},
        ),
        zhang.event(
            local(day, 12, 45),
            b[3],
            "delivered",
            location=near(10),
            pod={
                "recipient_name": "Xu Jie",
                "relation": "colleague",
                "signature_sha256": sig_b4,
                "photo_sha256": never_sent,
            },
        ),
        zhang.event(
            local(day, 14, 10),
            b[4],
            "delivered",
            location=near(11),
            pod={"recipient_name": "Ma Lin", "relation": "self", "signature_sha256": sig_b1},
        ),
    ]
    zhang.push(zhang_events, local(day, 15, 0))
    unbalanced = zhang.close(unbalanced, local(day, 17, 20))

    # Wang Qiang: seq 4 stays on the PDA.
    wang = Pda(session, devices["wangqiang"], couriers["wangqiang"])
    c = parcels(3)
    provisional = wang.open(local(day, 8, 20))
    sig_c1 = image(signature_png(21), couriers["wangqiang"])
    first = [wang.event(local(day, 8, 25 + i), tn, "checked_out") for i, tn in enumerate(c)]
    lost = wang.event(
        local(day, 11, 0),
        c[2],
        "delivered",
        pod={"recipient_name": "Hu Bo", "signature_sha256": sig_c1},
    )
    rest = [
        wang.event(
            local(day, 12, 0),
            c[0],
            "delivered",
            location=near(12),
            pod={"recipient_name": "Guo Mei", "signature_sha256": sig_c1},
        ),
        wang.event(local(day, 16, 30), c[1], "returned_to_station"),
    ]
    assert lost["seq"] == 4
    wang.push([*first, *rest], local(day, 17, 0))
    provisional = wang.close(provisional, local(day, 17, 30))

    # Chen Lu: still out.
    chen = Pda(session, devices["chenlu"], couriers["chenlu"])
    d = parcels(3)
    open_shift = chen.open(local(day, 9, 0))
    chen.push(
        [chen.event(local(day, 9, 5 + i), tn, "checked_out") for i, tn in enumerate(d)],
        local(day, 9, 10),
    )
    chen.push(
        [
            chen.event(
                local(day, 11, 0),
                d[0],
                "delivered",
                location=near(13),
                pod={"recipient_name": "Liu Yang", "signature_sha256": sig1},
            )
        ],
        local(day, 11, 5),
    )

    # Another station's day.
    zhao = Pda(session, devices["zhaolei"], couriers["zhaolei"])
    e = factories.parcel(session, other).tracking_no
    session.commit()
    other_shift = zhao.open(local(day, 8, 0))
    zhao.push([zhao.event(local(day, 8, 5), e, "checked_out")], local(day, 8, 10))
    other_shift = zhao.close(other_shift, local(day, 17, 0))

    drop_event_id = session.scalars(
        select(ScanEvent.id).where(
            ScanEvent.tracking_no == b[2], ScanEvent.type == "delivered_to_locker"
        )
    ).one()
    authorized_drop_event_id = session.scalars(
        select(ScanEvent.id).where(
            ScanEvent.client_event_id == uuid.UUID(authorized_drop["client_event_id"])
        )
    ).one()
    return StationDay(
        day=day,
        station=station,
        other_station=other,
        admin=people["admin"],
        manager=people["manager"],
        other_manager=people["other_manager"],
        auditor=people["auditor"],
        integration=people["integration"],
        couriers=couriers,
        balanced=balanced,
        unbalanced=unbalanced,
        provisional=provisional,
        open=open_shift,
        other_shift=other_shift,
        missing_parcel=b[1],
        dropped_parcel=b[2],
        drop_event_id=drop_event_id,
        authorized_drop_event_id=authorized_drop_event_id,
        uploaded=uploaded,
        not_uploaded=never_sent,
    )
