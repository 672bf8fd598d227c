"""Plays a planned station day through the API, as the PDAs, the station and the
recipients' channel would.

An admin sets the station up (station, manager, channel account, couriers and
PDAs); the channel takes the parcels in, planned for the couriers; each PDA signs
in, pulls its parcels, opens a shift, checks its parcels out, delivers, drops,
fails, returns, asks for consent at the door and waits for the answer, uploads
proof images, pushes in batches (or not, when offline) and closes its shift;
the channel grants consents before and after drops; last, the manager signs off
the shifts that balance. The day's events are dated over the three quarters of
an hour before the run (a recipient's consent recorded now counts for a drop
made within the hour: ``CONSENT_RECORDING_GRACE_MINUTES``), and every event
names its shift (the shifts open now, after the events they hold).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from courier_api.simulation.client import SimulationError, Transport
from courier_api.simulation.plan import (
    CourierPlan,
    DayPlan,
    Expected,
    Fate,
    ParcelPlan,
    Trait,
    expected_outcome,
)
from models import ServiceClass, utcnow
from sync.wording import counted

DAY_LENGTH = dt.timedelta(minutes=35)  # the span the day's events are dated over
DAY_ENDS_BEFORE_NOW = dt.timedelta(minutes=10)
SKEW = dt.timedelta(minutes=7)  # the skewed PDA's clock, fast
PUSH_EVERY = 5  # events an online PDA collects before it pushes
# Long polls of a second a PDA at the door makes for the recipient's answer. On
# PostgreSQL the feed holds back what a transaction still running anywhere on the
# server might precede, so one poll can come back empty on a busy server.
ANSWER_POLLS = 10
LOCKER = "LK-{n:02d}"
PICKUP_POINT = "PP-{n:02d}"
INTAKE_BATCH = 1000
# A 429 at sign-in is waited out when short (a station's PDAs behind one address);
# a long one is a locked-out username, which no waiting in a simulation should hide.
SIGN_IN_RETRIES = 10
MAX_SIGN_IN_WAIT_SECONDS = 60


@dataclass
class Result:
    plan: DayPlan
    expected: Expected
    station_id: int
    shift_ids: dict[str, int] = field(default_factory=dict)  # by courier username


class Simulation:
    def __init__(
        self,
        transport: Transport,
        plan: DayPlan,
        *,
        admin: tuple[str, str],
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.api = transport
        self.plan = plan
        self.names = plan.names
        self.admin_login = admin
        self.progress = progress

    # -- the day --------------------------------------------------------------------------

    def run(self) -> Result:
        admin = self._sign_in(*self.admin_login)
        self.station_id = self._set_up(admin)
        self.channel = self._sign_in(self.names.integration, self.names.integration_password)
        self._take_in()
        self.progress(
            f"station {self.names.station_code}: {counted(len(self.plan.couriers), 'courier')}, "
            f"{counted(len(self.plan.parcels), 'parcel')} taken in"
        )
        start = utcnow() - DAY_ENDS_BEFORE_NOW - DAY_LENGTH
        lost: dict[str, int] = {}
        shift_ids = {}
        for courier in self.plan.couriers:
            pda = Pda(self, courier, start)
            pda.work()
            shift_ids[courier.username] = pda.shift_id
            if pda.never_sent:
                lost[courier.username] = len(pda.never_sent)
            self.progress(
                f"courier {courier.index}/{len(self.plan.couriers)} {courier.username}"
                f"{' (' + ', '.join(sorted(courier.traits)) + ')' if courier.traits else ''}: "
                f"{counted(len(courier.parcels), 'parcel')}, {counted(pda.seq, 'event')} in "
                f"{counted(pda.pushes, 'push')}"
                f"{f', {len(pda.never_sent)} never sent' if pda.never_sent else ''}"
            )
        signed = self._sign_off_what_balances()
        self.progress(f"manager signed off {counted(signed, 'balanced shift')}")
        return Result(self.plan, expected_outcome(self.plan, lost), self.station_id, shift_ids)

    def _set_up(self, admin: str) -> int:
        names = self.names
        station = self.api.request(
            "POST",
            "/api/v1/stations",
            json_body={
                "code": names.station_code,
                "name": names.station_name,
                "timezone": names.timezone,
            },
            token=admin,
        ).ok()
        accounts = [
            (names.manager, "station_manager", station["id"], names.manager_password, "Wang Fang"),
            (names.integration, "integration", None, names.integration_password, "SMS gateway"),
        ] + [
            (c.username, "courier", station["id"], names.courier_password, c.full_name)
            for c in self.plan.couriers
        ]
        for username, role, station_id, password, full_name in accounts:
            self.api.request(
                "POST",
                "/api/v1/users",
                json_body={
                    "username": username,
                    "role": role,
                    "station_id": station_id,
                    "password": password,
                    "full_name": full_name,
                },
                token=admin,
            ).ok()
        for courier in self.plan.couriers:
            self.api.request(
                "POST",
                "/api/v1/devices",
                json_body={"device_id": courier.device_id, "station_id": station["id"]},
                token=admin,
            ).ok()
        return int(station["id"])

    def _take_in(self) -> None:
        items = [
            {
                "tracking_no": parcel.tracking_no,
                "service_class": parcel.service_class.value,
                "recipient_name": parcel.recipient_name,
                "recipient_phone": parcel.recipient_phone,
                "address": parcel.address,
                "lat": parcel.lat,
                "lon": parcel.lon,
                "station": self.names.station_code,
                "courier": courier.username,
            }
            for courier in self.plan.couriers
            for parcel in courier.parcels
        ]
        for start in range(0, len(items), INTAKE_BATCH):
            answer = self.api.request(
                "POST",
                "/api/v1/parcels",
                json_body={"parcels": items[start : start + INTAKE_BATCH]},
                token=self.channel,
            ).ok()
            if answer["counts"]["rejected"]:
                raise SimulationError(f"intake rejected parcels: {answer['results']}")

    def _sign_off_what_balances(self) -> int:
        manager = self._sign_in(self.names.manager, self.names.manager_password)
        board = self.api.request(
            "GET", f"/api/v1/stations/{self.station_id}/handover", token=manager
        ).ok()
        signed = 0
        for row in board["shifts"]:
            if row["balance"]["status"] == "balanced" and row["shift_status"] == "closed":
                self.api.request(
                    "POST",
                    f"/api/v1/shifts/{row['shift_id']}/signoff",
                    json_body={"note": "all parcels accounted for"},
                    token=manager,
                ).ok()
                signed += 1
        return signed

    # -- the channel ----------------------------------------------------------------------

    def grant(self, parcel: ParcelPlan, granted_at: dt.datetime, point_id: str) -> None:
        """The recipient agrees in the app (a consent for this parcel, this locker)."""
        self.api.request(
            "POST",
            "/api/v1/consents",
            json_body={
                "tracking_no": parcel.tracking_no,
                "method": "locker",
                "point_id": point_id,
                "channel": "app",
                "granted_at": granted_at.isoformat(),
                "evidence": "in-app confirmation",
            },
            token=self.channel,
        ).ok()

    def answer_request(self, parcel: ParcelPlan, granted_at: dt.datetime) -> None:
        """The SMS gateway relays the recipient's YES to the request about this parcel."""
        listed = self.api.request(
            "GET",
            f"/api/v1/consents/requests?tracking_no={parcel.tracking_no}&status=pending",
            token=self.channel,
        ).ok()
        if not listed["items"]:
            raise SimulationError(f"no pending consent request for {parcel.tracking_no}")
        self.api.request(
            "POST",
            "/api/v1/consents",
            json_body={
                "request_id": listed["items"][-1]["id"],
                "channel": "sms",
                "granted_at": granted_at.isoformat(),
                "evidence": "SMS reply YES",
            },
            token=self.channel,
        ).ok(201)

    def _sign_in(self, username: str, password: str, device_id: str | None = None) -> str:
        body: dict[str, Any] = {"username": username, "password": password}
        if device_id:
            body["device_id"] = device_id
        for _ in range(SIGN_IN_RETRIES):
            answer = self.api.request("POST", "/api/v1/auth/token", json_body=body)
            if answer.status != 429 or answer.retry_after is None:
                return str(answer.ok()["access_token"])
            if answer.retry_after > MAX_SIGN_IN_WAIT_SECONDS:  # locked out: say so now
                break
            # A whole station signing in from one address may meet the per-address
            # limit (SIGN_IN_ATTEMPTS_PER_ADDRESS): wait as told, like a PDA would.
            time.sleep(answer.retry_after)
        raise SimulationError(
            f"{username} cannot sign in: {answer.status} "
            f"(Retry-After {answer.retry_after} s) {str(answer.body)[:200]}"
        )


class Pda:
    """One courier's PDA through the day."""

    def __init__(self, sim: Simulation, plan: CourierPlan, start: dt.datetime) -> None:
        self.sim = sim
        self.api = sim.api
        self.plan = plan
        self.skew = SKEW if Trait.SKEWED_CLOCK in plan.traits else dt.timedelta(0)
        self.offline = Trait.OFFLINE in plan.traits
        self.seq = 0
        self.pushes = 0
        self.pending: list[dict[str, Any]] = []
        self.never_sent: list[dict[str, Any]] = []
        self.retried = Trait.RETRIES not in plan.traits  # one retry when it has the trait
        self.cursor = ""
        self.start = start
        self.step = DAY_LENGTH / (4 * len(plan.parcels) + 1)  # at most four events a parcel
        self.token = sim._sign_in(plan.username, sim.names.courier_password, plan.device_id)
        self.shift_id = 0

    def work(self) -> None:
        held = self._pull_everything()
        if len(held) != len(self.plan.parcels):
            raise SimulationError(
                f"{self.plan.username} pulled {len(held)} parcels, "
                f"{len(self.plan.parcels)} were planned for them"
            )
        self.shift_id = self.api.request(
            "POST", "/api/v1/shifts", json_body={"first_seq": 1}, token=self.token
        ).ok()["id"]
        for parcel in self.plan.parcels:
            self.record(parcel.tracking_no, "checked_out")
        self.push_if_online(force=True)
        half = len(self.plan.parcels) // 2
        for n, parcel in enumerate(self.plan.parcels):
            if parcel.lost:
                self.push_if_online(force=True)  # what came before still goes
                self._deliver(parcel, n, sent=False)
                continue
            self._deliver(parcel, n)
            if self.offline and n + 1 == half:
                self.push()  # back in coverage for a moment, hours late
            self.push_if_online()
        self.push_if_online(force=True)
        self.api.request(
            "POST",
            f"/api/v1/shifts/{self.shift_id}/close",
            json_body={"last_seq": self.seq},
            token=self.token,
        ).ok()
        if self.offline:
            self.push()  # the afternoon's batch, after the shift was closed

    # -- one parcel -------------------------------------------------------------------------

    def _deliver(self, parcel: ParcelPlan, n: int, sent: bool = True) -> None:
        fate = parcel.fate
        locker = LOCKER.format(n=1 + n % 12)
        tn = parcel.tracking_no
        record = self.record if sent else self.record_never_sent
        if fate == Fate.DELIVERED:
            record(tn, "delivered", pod=self._proof(parcel, with_images=sent), near=parcel)
        elif fate == Fate.DELIVERED_WITHOUT_POD:
            record(tn, "delivered", pod={"recipient_name": parcel.recipient_name}, near=parcel)
        elif fate in (Fate.LOCKER, Fate.LOCKER_WITHOUT_CONSENT):
            record(tn, "delivered_to_locker", **self._locker(locker, n))
        elif fate == Fate.LOCKER_CONSENT_BEFORE:
            self.sim.grant(parcel, self.now() - self.step / 2, locker)
            record(tn, "delivered_to_locker", **self._locker(locker, n))
        elif fate == Fate.LOCKER_CONSENT_AFTER:
            record(tn, "delivered_to_locker", **self._locker(locker, n))
            self.sim.grant(parcel, self.now() + self.step / 2, locker)
        elif fate == Fate.PICKUP_POINT_CAPTURED:
            point = PICKUP_POINT.format(n=1 + n % 5)
            consent = {"method": "pickup_point", "point_id": point, "channel": "phone_call"}
            record(tn, "consent_captured", consent=consent)
            record(tn, "delivered_to_pickup_point", point_id=point, pod=self._code(n))
        elif fate == Fate.DOOR_REQUEST_GRANTED:
            self._ask_at_the_door(parcel, locker, n)
        elif fate == Fate.RETURNED:
            record(tn, "delivery_attempt_failed", reason="recipient_absent", action="notice_left")
            record(tn, "returned_to_station")
        elif fate == Fate.MISSING:
            record(tn, "out_for_delivery")

    def _ask_at_the_door(self, parcel: ParcelPlan, locker: str, n: int) -> None:
        """Nobody home: ask for consent, wait at the door for the answer, then drop."""
        tn = parcel.tracking_no
        self.record(
            tn, "delivery_attempt_failed", reason="recipient_absent", action="retry_planned"
        )
        expires = self.now() + dt.timedelta(hours=2)
        self.record(
            tn,
            "consent_requested",
            request={
                "method": "locker",
                "point_id": locker,
                "channel": "sms",
                "expires_at": (expires + self.skew).isoformat(),
            },
        )
        self.push()
        self.clock_tick()  # the recipient reads the SMS and answers
        self.sim.answer_request(parcel, self.now())
        answered: list[dict[str, Any]] = []
        for _ in range(ANSWER_POLLS):  # a PDA waiting at the door keeps asking
            answered = [
                r
                for c in self._pull(wait=1)
                if c["kind"] == "consent_request" and c["tracking_no"] == tn
                for r in c["parcel"]["consent_requests"]
                if r["status"] == "granted"
            ]
            if answered:
                break
        if not answered:
            raise SimulationError(f"the grant for {tn} did not reach {self.plan.username}")
        self.record(tn, "delivered_to_locker", **self._locker(locker, n))

    # -- the PDA's own work ---------------------------------------------------------------------

    def now(self) -> dt.datetime:
        """The day's clock (true time; the PDA's own clock is ``now() + skew``)."""
        return self.start + self.step * self.seq

    def clock_tick(self) -> None:
        self.start += self.step / 3

    def _event(self, tracking_no: str, type: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        near = fields.pop("near", None)
        if near is not None:
            # A few metres from the address: GPS as the PDA reads it.
            fields["location"] = {"lat": near.lat + 0.0001, "lon": near.lon, "accuracy_m": 8.0}
        return {
            "client_event_id": str(uuid.uuid4()),
            "seq": self.seq,
            "type": type,
            "tracking_no": tracking_no,
            "occurred_at": (self.now() + self.skew).isoformat(),
            "shift_id": self.shift_id,
            **fields,
        }

    def record(self, tracking_no: str, type: str, **fields: Any) -> None:
        self.pending.append(self._event(tracking_no, type, **fields))

    def record_never_sent(self, tracking_no: str, type: str, **fields: Any) -> None:
        self.never_sent.append(self._event(tracking_no, type, **fields))

    def push_if_online(self, force: bool = False) -> None:
        if not self.offline and (force or len(self.pending) >= PUSH_EVERY):
            self.push()

    def push(self) -> None:
        if not self.pending:
            return
        body = {
            "device_id": self.plan.device_id,
            "batch_id": str(uuid.uuid4()),
            "sent_at": (utcnow() + self.skew).isoformat(),
            "events": self.pending,
        }
        receipt = self.api.request(
            "POST", "/api/v1/sync/push", json_body=body, token=self.token
        ).ok()
        refused = [r for r in receipt["results"] if r["status"] == "rejected"]
        if refused:
            raise SimulationError(f"{self.plan.username}'s push was refused in part: {refused}")
        if not self.retried and self.seq > len(self.plan.parcels):
            # The answer never reached the PDA: it sends the same batch again.
            again = self.api.request(
                "POST", "/api/v1/sync/push", json_body=body, token=self.token
            ).ok()
            if again != receipt:
                raise SimulationError("a batch sent again got another receipt")
            self.retried = True
        self.pushes += 1
        self.pending = []

    def _pull(self, wait: int = 0) -> list[dict[str, Any]]:
        changes: list[dict[str, Any]] = []
        while True:
            query = f"cursor={self.cursor}" + (f"&wait={wait}" if wait and self.cursor else "")
            page = self.api.request("GET", f"/api/v1/sync/pull?{query}", token=self.token).ok()
            changes += page["changes"]
            self.cursor = page["next_cursor"]
            if not page["has_more"]:
                return changes

    def _pull_everything(self) -> set[str]:
        return {c["tracking_no"] for c in self._pull() if c["kind"] == "parcel"}

    def _proof(self, parcel: ParcelPlan, *, with_images: bool) -> dict[str, Any]:
        """Express: a signature and a photo; other classes: a photo at the door. The
        name alone would prove nothing."""
        pod: dict[str, Any] = {"recipient_name": parcel.recipient_name, "relation": "self"}
        images = [("photo_sha256", _photo)]
        if parcel.service_class == ServiceClass.EXPRESS:
            images.insert(0, ("signature_sha256", _signature))
        for key, image in images:
            data = image(parcel.tracking_no)
            digest = hashlib.sha256(data).hexdigest()
            if with_images:
                self.api.request(
                    "PUT",
                    f"/api/v1/blobs/{digest}",
                    content=data,
                    content_type="image/png",
                    token=self.token,
                ).ok()
            pod[key] = digest
        return pod

    def _locker(self, locker: str, n: int) -> dict[str, Any]:
        return {"locker_id": locker, "compartment": str(1 + n % 24), "pod": self._code(n)}

    def _code(self, n: int) -> dict[str, Any]:
        return {"pickup_code": f"{(7919 * (n + 1) + self.plan.index) % 10_000:04d}"}


def _signature(tracking_no: str) -> bytes:
    """A small signature image, different for every parcel."""
    seed = hashlib.sha256(tracking_no.encode()).digest()
    image = Image.new("L", (96, 32), 255)
    draw = ImageDraw.Draw(image)
    points = [(8 + 10 * i, 6 + seed[i] % 20) for i in range(9)]
    draw.line(points, fill=0, width=2)
    return _png(image)


def _photo(tracking_no: str) -> bytes:
    """A small 'photo' of the parcel at the door."""
    seed = hashlib.sha256(b"photo" + tracking_no.encode()).digest()
    image = Image.new("RGB", (64, 48), (seed[0], seed[1], seed[2]))
    draw = ImageDraw.Draw(image)
    draw.rectangle((16, 12, 48, 40), fill=(160, 120, 70), outline=(60, 40, 20))
    return _png(image)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
