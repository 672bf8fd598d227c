"""One of every subject the API addresses by id, at one station, for the whole-API tests
(``test_openapi_conformance``, ``test_authorization_matrix``).

On top of the page tests' station day (``tests.browser.station_day``: station PDG with
couriers, PDAs, shifts balanced, unbalanced, provisional and open, flags, proofs and
images, and station MHG with a courier and a shift of its own) it adds what the day
lacks: a consent and a consent request, a rejected event in quarantine, an issued
report, a webhook subscription with a dead delivery, and a spare user and PDA that
writes may change without touching the callers. Everything belongs to PDG unless its
name says otherwise; every password is ``factories.PASSWORD``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from courier_api.extensions import db
from models import BlobUpload, Flag, FlagStatus, StationReport, WebhookDelivery, utcnow
from sync import outbox, reports, webhooks
from sync.webhooks import DeliverySettings, SendResult
from tests import factories
from tests.browser import station_day
from tests.browser.station_day import StationDay
from tests.conftest import Auth

# Who signs in as what: (username, PDA) of the station day's people.
ADMIN = ("admin", None)
AUDITOR = ("auditor", None)
INTEGRATION = ("recipient-app", None)
MANAGER = ("manager", None)  # of PDG
OTHER_MANAGER = ("manager.mhg", None)
COURIER = ("zhangmin", "PDA-PDG-02")  # of PDG: the unbalanced shift is hers
# Her colleague at PDG, on his own PDA: the balanced shift and its images are his, so
# what he may do to hers (close it, read it, push into it, read her images) is tested.
COLLEAGUE = ("liwei", "PDA-PDG-01")
OTHER_COURIER = ("zhaolei", "PDA-MHG-05")
DEADLINES = {"express": 24, "registered": 48, "parcel": 72, "ordinary": 96}


class _Refuse:
    """A webhook receiver that always answers 500, without a network."""

    def send(self, *, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        return SendResult(status_code=500, body="no")

    def close(self) -> None:
        pass


@dataclass
class Subjects:
    day: StationDay
    parcel: str  # a PDG parcel, taken in, with a consent
    consent_id: int
    consent_request_id: int  # asked by COURIER
    proof_event_id: int  # COURIER's locker drop without consent
    blob: str  # an image COURIER uploaded
    flag_id: int  # an open flag at PDG
    report_id: int  # an issued report of PDG
    subscription_id: int
    delivery_id: int  # dead: replayable
    spare_user_id: int  # a PDG courier no test signs in as
    spare_device: str  # a PDG PDA no one signs in with
    refresh_token: str  # ADMIN's

    @property
    def station_id(self) -> int:
        return self.day.station.id


def build(session: Session, app: Flask, client: FlaskClient) -> Subjects:
    """The subjects, committed into the test's transaction (savepoints)."""
    day = station_day.build(session, app.config["BLOB_DIR"], history_days=0)
    spare_user = factories.user(session, "spare.courier", "courier", day.station)
    spare_device = factories.device(session, "PDA-PDG-99", day.station)
    # Issued reports need a station older than the day they cover.
    day.station.created_at = utcnow() - dt.timedelta(days=10)
    session.commit()

    auth = Auth(client)
    admin, courier = auth.headers(*ADMIN), auth.headers(*COURIER)
    refresh_token = auth.tokens(*ADMIN)["refresh_token"]
    consent = client.post(
        "/api/v1/consents",
        json={
            "tracking_no": day.missing_parcel,
            "method": "locker",
            "channel": "app",
            "granted_at": (utcnow() - dt.timedelta(hours=1)).isoformat(),
        },
        headers=auth.headers(*INTEGRATION),
    )
    assert consent.status_code == 201, consent.get_json()
    request = client.post(
        "/api/v1/consents/requests",
        json={"tracking_no": day.dropped_parcel, "method": "locker", "channel": "sms"},
        headers=courier,
    )
    assert request.status_code == 201, request.get_json()
    bad_event = {"client_event_id": str(uuid.uuid4()), "seq": 900, "type": "teleported"}
    push = client.post(
        "/api/v1/sync/push",
        json=factories.push_body(COURIER[1], [bad_event]),
        headers=courier,
    )
    assert push.get_json()["results"][0]["status"] == "rejected", push.get_json()
    subscription = client.post(
        "/api/v1/webhooks/subscriptions",
        json={"url": "http://127.0.0.1:9/hook", "topics": ["parcel.in_locker"]},
        headers=admin,
    )
    assert subscription.status_code == 201, subscription.get_json()
    outbox.announce(
        session=session,
        topic="parcel.in_locker",
        ordering_key=day.dropped_parcel,
        station_id=day.station.id,
        data={"tracking_no": day.dropped_parcel},
    )
    session.commit()
    webhooks.deliver_due(
        sessions=db.sessionmaker_of(app),
        now=utcnow(),
        settings=DeliverySettings(max_attempts=1),
        sender=_Refuse(),
        worker_id="subjects",
    )
    reports.issue_due_reports(
        session=session, now=utcnow() + dt.timedelta(days=2), deadlines=DEADLINES
    )
    session.commit()
    flag_id = session.scalars(
        select(Flag.id)
        .where(Flag.station_id == day.station.id, Flag.status == FlagStatus.OPEN)
        .order_by(Flag.id)
        .limit(1)
    ).one()
    report_id = session.scalars(
        select(StationReport.id)
        .where(StationReport.station_id == day.station.id)
        .order_by(StationReport.id)
        .limit(1)
    ).one()
    delivery_id = session.scalars(select(WebhookDelivery.id).order_by(WebhookDelivery.id)).first()
    assert delivery_id is not None
    blob = session.scalars(
        select(BlobUpload.sha256)
        .where(BlobUpload.uploaded_by == day.couriers[COURIER[0]].id)
        .order_by(BlobUpload.id)
        .limit(1)
    ).one()
    return Subjects(
        day=day,
        parcel=day.missing_parcel,
        consent_id=consent.get_json()["id"],
        consent_request_id=request.get_json()["id"],
        proof_event_id=day.drop_event_id,
        blob=blob,
        flag_id=flag_id,
        report_id=report_id,
        subscription_id=subscription.get_json()["id"],
        delivery_id=delivery_id,
        spare_user_id=spare_user.id,
        spare_device=spare_device.id,
        refresh_token=refresh_token,
    )


def path_parameters(subjects: Subjects) -> dict[str, Any]:
    """A real value for every path parameter of the API, by its name in the OpenAPI."""
    return {
        "station_id": subjects.station_id,
        "user_id": subjects.spare_user_id,
        "device_id": subjects.spare_device,
        "tracking_no": subjects.parcel,
        "sha256": subjects.blob,
        "consent_id": subjects.consent_id,
        "request_id": subjects.consent_request_id,
        "event_id": subjects.proof_event_id,
        "flag_id": subjects.flag_id,
        "shift_id": subjects.day.unbalanced.id,
        "report_id": subjects.report_id,
        "subscription_id": subjects.subscription_id,
        "delivery_id": subjects.delivery_id,
    }


# -- one valid request per API operation ------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request that is valid for the caller it is built for: what it answers is about
    who may send it, not about its shape. ``json`` or ``data`` (+ ``content_type``)."""

    path: Mapping[str, Any]
    query: Mapping[str, Any] | None = None
    json: Any = None
    data: bytes | None = None
    content_type: str | None = None


Caller = tuple[str, str | None]  # (username, PDA)
Builder = Callable[[Subjects, Caller], Request]
NEW_PNG = station_day.doorstep_png(4242)


def _same(path: Callable[[Subjects], Mapping[str, Any]] = lambda s: {}, **kw: Any) -> Builder:
    return lambda s, caller: Request(path(s), **kw)


def _push(s: Subjects, caller: Caller) -> Request:
    """One well-formed event, from the caller's own PDA (couriers) or COURIER's, naming
    the subject's shift (COURIER's): a colleague's event is stored, not filed under it."""
    device = caller[1] or COURIER[1]
    shift_id = path_parameters(s)["shift_id"]
    event = factories.event(1000, s.parcel, "out_for_delivery", shift_id=shift_id)
    return Request({}, json=factories.push_body(device, [event]))


def _with_refresh_token(s: Subjects, caller: Caller) -> Request:
    return Request({}, json={"refresh_token": s.refresh_token})


def _now(**delta: float) -> str:
    return (utcnow() + dt.timedelta(**delta)).isoformat()


def _new_parcel(s: Subjects, caller: Caller) -> Request:
    item = {
        "tracking_no": factories.s10(),
        "service_class": "parcel",
        "recipient_name": "New Recipient",
        "address": "9 New Road",
        "station": s.day.station.code,
    }
    return Request({}, json={"parcels": [item]})


def _consent(s: Subjects, caller: Caller) -> Request:
    body = {"tracking_no": s.parcel, "method": "any", "channel": "sms", "granted_at": _now()}
    return Request({}, json=body)


OWN = lambda name: lambda s: {name: path_parameters(s)[name]}  # noqa: E731
# "METHOD /openapi/path" -> how to build its request (path parameters from ``path_parameters``).
REQUESTS: dict[str, Builder] = {
    "GET /healthz": _same(),
    "GET /readyz": _same(),
    "POST /api/v1/auth/token": _same(json={"username": ADMIN[0], "password": factories.PASSWORD}),
    "POST /api/v1/auth/refresh": _with_refresh_token,
    "POST /api/v1/auth/logout": _with_refresh_token,
    "GET /api/v1/stations": _same(),
    "POST /api/v1/stations": _same(json={"code": "NEW1", "name": "New station"}),
    "GET /api/v1/stations/{station_id}": _same(OWN("station_id")),
    "PATCH /api/v1/stations/{station_id}": _same(OWN("station_id"), json={"name": "Renamed"}),
    "GET /api/v1/users": _same(),
    "POST /api/v1/users": lambda s, caller: Request(
        {},
        json={
            "username": "new.courier",
            "role": "courier",
            "station_id": s.station_id,
            "password": "new-password-1",
        },
    ),
    "GET /api/v1/users/{user_id}": _same(OWN("user_id")),
    "PATCH /api/v1/users/{user_id}": _same(OWN("user_id"), json={"full_name": "Renamed"}),
    "GET /api/v1/devices": _same(),
    "POST /api/v1/devices": lambda s, caller: Request(
        {}, json={"device_id": "PDA-PDG-NEW", "station_id": s.station_id}
    ),
    "GET /api/v1/devices/{device_id}": _same(OWN("device_id")),
    "PATCH /api/v1/devices/{device_id}": _same(OWN("device_id"), json={"status": "active"}),
    # The spare PDA, sent to the other station (MHG): no shift, nothing unsent.
    "POST /api/v1/devices/{device_id}/move": lambda s, caller: Request(
        OWN("device_id")(s), json={"station_id": s.day.other_station.id}
    ),
    "GET /api/v1/devices/{device_id}/lost-seqs": _same(lambda s: {"device_id": COURIER[1]}),
    # COURIER's PDA: its rejected event at seq 900 left the seqs below it not pushed missing.
    "POST /api/v1/devices/{device_id}/lost-seqs": _same(
        lambda s: {"device_id": COURIER[1]}, json={"seqs": [899], "reason": "PDA reset"}
    ),
    "POST /api/v1/parcels": _new_parcel,
    "GET /api/v1/parcels/{tracking_no}": _same(OWN("tracking_no")),
    "POST /api/v1/sync/push": _push,
    "GET /api/v1/sync/pull": _same(),
    "GET /api/v1/blobs/{sha256}": _same(OWN("sha256")),
    "PUT /api/v1/blobs/{sha256}": lambda s, caller: Request(
        {"sha256": hashlib.sha256(NEW_PNG).hexdigest()}, data=NEW_PNG, content_type="image/png"
    ),
    "GET /api/v1/consents": _same(),
    "POST /api/v1/consents": _consent,
    "GET /api/v1/consents/{consent_id}": _same(OWN("consent_id")),
    "POST /api/v1/consents/{consent_id}/revoke": _same(
        OWN("consent_id"), json={"reason": "asked to"}
    ),
    "GET /api/v1/consents/requests": _same(),
    "POST /api/v1/consents/requests": lambda s, caller: Request(
        {}, json={"tracking_no": s.parcel, "method": "locker", "channel": "sms"}
    ),
    "GET /api/v1/consents/requests/{request_id}": _same(OWN("request_id")),
    "GET /api/v1/proofs": _same(),
    "GET /api/v1/proofs/export.csv": _same(),
    "GET /api/v1/proofs/{event_id}": _same(OWN("event_id")),
    "GET /api/v1/quarantine": _same(),
    "GET /api/v1/audit": _same(),
    "GET /api/v1/audit/verify": _same(),
    "GET /api/v1/flags": _same(),
    "GET /api/v1/flags/{flag_id}": _same(OWN("flag_id")),
    "POST /api/v1/flags/{flag_id}/acknowledge": _same(OWN("flag_id"), json={"note": "seen"}),
    "POST /api/v1/flags/{flag_id}/resolve": _same(OWN("flag_id"), json={"note": "found it"}),
    "GET /api/v1/shifts": _same(),
    "POST /api/v1/shifts": _same(json={}),
    "GET /api/v1/shifts/{shift_id}": _same(OWN("shift_id")),
    "POST /api/v1/shifts/{shift_id}/close": _same(OWN("shift_id"), json={}),
    "GET /api/v1/shifts/{shift_id}/balance": _same(OWN("shift_id")),
    "POST /api/v1/shifts/{shift_id}/signoff": _same(OWN("shift_id"), json={"note": "all good"}),
    "POST /api/v1/stations/{station_id}/signoffs": lambda s, caller: Request(
        OWN("station_id")(s),
        json={
            "note": "all good",
            "shifts": [{"shift_id": path_parameters(s)["shift_id"], "balance_version": "seen"}],
        },
    ),
    "GET /api/v1/stations/{station_id}/handover": _same(OWN("station_id")),
    "GET /api/v1/stations/{station_id}/reports/daily": _same(OWN("station_id")),
    "GET /api/v1/stations/{station_id}/reports/weekly": _same(OWN("station_id")),
    "GET /api/v1/stations/{station_id}/reports/monthly": _same(OWN("station_id")),
    "GET /api/v1/stations/{station_id}/reports": _same(OWN("station_id")),
    "GET /api/v1/reports/{report_id}": _same(OWN("report_id")),
    "GET /api/v1/jobs": _same(),
    "GET /api/v1/jobs/runs": _same(),
    "GET /api/v1/webhooks/subscriptions": _same(),
    "POST /api/v1/webhooks/subscriptions": _same(
        json={"url": "http://127.0.0.1:9/other", "topics": ["flag.raised"]}
    ),
    "GET /api/v1/webhooks/subscriptions/{subscription_id}": _same(OWN("subscription_id")),
    "PATCH /api/v1/webhooks/subscriptions/{subscription_id}": _same(
        OWN("subscription_id"), json={"description": "renamed"}
    ),
    "POST /api/v1/webhooks/subscriptions/{subscription_id}/secret": _same(
        OWN("subscription_id"), json={"grace_hours": 1}
    ),
    "GET /api/v1/webhooks/topics": _same(),
    "GET /api/v1/webhooks/deliveries": _same(),
    "GET /api/v1/webhooks/deliveries/{delivery_id}": _same(OWN("delivery_id")),
    "POST /api/v1/webhooks/deliveries/{delivery_id}/replay": _same(OWN("delivery_id")),
    "POST /api/v1/webhooks/deliveries/purge": lambda s, caller: Request(
        {}, json={"status": "dead", "before": _now(days=1)}
    ),
}
