"""Requests that race each other, with real commits (on SQLite and on PostgreSQL)."""

import datetime as dt
import io
import json
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from courier_api.api.shifts import routes as shift_routes
from courier_api.extensions import db
from models import AuditEntry, AuditEntryParcel, Blob, Flag, Parcel, SignInAttempt, Station
from sync import blobs as blobs_module
from sync import directory
from sync import ingest as ingest_module
from tests import factories
from tests.conftest import Auth
from tests.courier_api.test_blobs_api import image_bytes, put
from tests.courier_api.test_web_pages import Pages
from tests.threads import race, race_requests

PUSH = "/api/v1/sync/push"


def test_concurrent_intakes_of_the_same_parcels_both_succeed(committed_app: Flask) -> None:
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="RACE")
        factories.user(session, "racer", "admin")
        session.commit()
        station_code = station.code
    headers = Auth(committed_app.test_client()).headers("racer")
    numbers = [factories.s10() for _ in range(200)]
    body = {
        "parcels": [
            {
                "tracking_no": n,
                "service_class": "parcel",
                "recipient_name": "R",
                "address": "A",
                "station": station_code,
            }
            for n in numbers
        ]
    }

    responses = race(committed_app, "/api/v1/parcels", [body] * 4, headers)

    assert [r.status_code for r in responses] == [200] * 4, [r.get_json() for r in responses]
    created = sum(r.get_json()["counts"]["created"] for r in responses)
    unchanged = sum(r.get_json()["counts"]["unchanged"] for r in responses)
    assert (created, unchanged) == (200, 600)
    with committed_app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Parcel))
    assert stored == 200


def test_the_board_a_balance_pulls_reports_and_flags_answer_while_a_writer_holds_the_database(
    committed_app: Flask,
) -> None:
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="READ")
        factories.user(session, "reader-boss", "station_manager", station)
        factories.user(session, "reader-rider", "courier", station)
        factories.device(session, "PDA-READ", station)
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    auth = Auth(client)
    manager = auth.headers("reader-boss")
    courier = auth.headers("reader-rider", "PDA-READ")
    opened = client.post("/api/v1/shifts", json={"first_seq": 1}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    first_pull = client.get("/api/v1/sync/pull", headers=courier).get_json()
    pages = Pages(committed_app.test_client())
    assert pages.login("reader-boss").status_code == 302
    engine = db.engine_of(committed_app)
    with engine.begin() as writer:  # a push in progress: on SQLite, the writers' turn
        writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        started = time.monotonic()
        answers = [
            client.get(f"/api/v1/stations/{station_id}/handover", headers=manager),
            client.get(f"/api/v1/shifts/{shift_id}/balance", headers=manager),
            client.get("/api/v1/sync/pull", headers=courier),
            # From a cursor, waiting a second for news that does not come (a long poll).
            client.get(
                "/api/v1/sync/pull",
                query_string={"cursor": first_pull["next_cursor"], "wait": 1},
                headers=courier,
            ),
            pages.client.get("/web/board"),
            client.get(f"/api/v1/stations/{station_id}/reports/daily", headers=manager),
            client.get("/api/v1/flags", headers=manager),
            pages.client.get("/web/reports/daily"),
            pages.client.get("/web/flags"),
        ]
        waited = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 9, [a.get_data()[:300] for a in answers]
    # Read from the last commit at once (the long poll's second aside), not after the
    # busy timeout of 10 s on SQLite, nor with a 503 for a turn that never came.
    assert waited < 6
    assert answers[0].get_json()["totals"]["shifts"] == 1
    assert answers[3].get_json()["changes"] == []
    assert "Busy" not in answers[4].get_data(as_text=True)  # not the uncommitted name


def _board_that_writes(*, session: Session, station_id: int, work_date: Any) -> list[Any]:
    """A station board with a bug: it writes."""
    session.execute(update(Station).where(Station.id == station_id).values(name="Oops"))
    return []


def _read_a_board_that_writes(
    app: Flask, manager: str, station_id: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, FlaskClient]:
    """The station's board as ``manager`` reads it, answered as in production."""
    app.config["PROPAGATE_EXCEPTIONS"] = False
    client = app.test_client()
    headers = Auth(client).headers(manager)
    monkeypatch.setattr(shift_routes, "station_board", _board_that_writes)
    return client.get(f"/api/v1/stations/{station_id}/handover", headers=headers), client


def test_a_view_that_only_reads_and_writes_anyway_is_a_500_not_a_retry(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="RDWR")
        factories.user(session, "rdwr-boss", "station_manager", station)
        session.commit()
        station_id = station.id
    answer, _ = _read_a_board_that_writes(committed_app, "rdwr-boss", station_id, monkeypatch)
    # A bug to fix, not a database to wait for: no 503 with Retry-After for PDAs to
    # retry forever, on either store.
    assert answer.status_code == 500, answer.get_json()
    assert answer.get_json()["code"] == "internal_error"
    with committed_app.app_context():
        assert db.session.get(Station, station_id).name != "Oops"


def test_api_tests_on_sqlite_hold_reading_views_to_reading_too(
    app: Flask, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API tests run inside one test transaction, not on the reading engine: on
    SQLite its connection refuses writes for the length of a reading request, so every
    test of such a view also checks that it writes nothing."""
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("PostgreSQL cannot make a transaction read-only midway")
    station = factories.station(session, code="BNDR")
    factories.user(session, "bound-boss", "station_manager", station)
    session.commit()
    answer, client = _read_a_board_that_writes(app, "bound-boss", station.id, monkeypatch)
    assert answer.status_code == 500, answer.get_json()
    # After the request the test's connection writes again.
    monkeypatch.undo()
    parcel = {
        "tracking_no": factories.s10(),
        "service_class": "parcel",
        "recipient_name": "R",
        "address": "A",
        "station": "BNDR",
    }
    headers = Auth(client).headers("bound-boss")
    assert (
        client.post("/api/v1/parcels", json={"parcels": [parcel]}, headers=headers).status_code
        == 200
    )


class _SlowUpload(io.BytesIO):
    """A request body arriving over a weak signal: its first half, then nothing until
    ``rest`` is set (``halfway`` is set when the server asks for more)."""

    def __init__(self, body: bytes, rest: threading.Event) -> None:
        super().__init__(body)
        self._half = len(body) // 2
        self._rest = rest
        self.halfway = threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self._half:
            self.halfway.set()
            self._rest.wait(timeout=60)
        elif size is None or size < 0 or self.tell() + size > self._half:
            size = self._half - self.tell()
        return super().read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def test_a_push_still_uploading_holds_up_no_other_push(committed_app: Flask) -> None:
    """A PDA on a weak signal takes seconds to send its batch: the body is read before
    the request's first query, so it holds no database connection meanwhile, and on
    SQLite not the writers' turn (every other push would wait for it)."""
    with committed_app.app_context():
        pdas = {"slow-rider": "PDA-SLOW", "fast-rider": "PDA-FAST"}
        _, numbers = factories.station_with_pdas(db.session, "SLOW", pdas, parcels=2)
        db.session.commit()
    auth = Auth(committed_app.test_client())
    slow = auth.headers("slow-rider", "PDA-SLOW")
    fast = auth.headers("fast-rider", "PDA-FAST")
    body = json.dumps(factories.push_body("PDA-SLOW", [factories.event(1, numbers[0])])).encode()
    rest = threading.Event()
    upload = _SlowUpload(body, rest)
    slow_answer: list[Any] = []

    def upload_slowly() -> None:
        slow_answer.append(
            committed_app.test_client().post(
                "/api/v1/sync/push",
                input_stream=upload,
                content_length=len(body),
                content_type="application/json",
                headers=slow,
            )
        )

    uploader = threading.Thread(target=upload_slowly)
    uploader.start()
    try:
        assert upload.halfway.wait(timeout=30)  # the slow request is in, half its body read
        started = time.monotonic()
        answer = committed_app.test_client().post(
            "/api/v1/sync/push",
            json=factories.push_body("PDA-FAST", [factories.event(1, numbers[1])]),
            headers=fast,
        )
        waited = time.monotonic() - started
    finally:
        rest.set()
        uploader.join(timeout=60)
    assert answer.status_code == 200, answer.get_json()
    assert waited < 5  # not the busy timeout of 10 s that SQLite's turn would have cost
    assert slow_answer[0].status_code == 200, slow_answer[0].get_json()
    assert [r["status"] for r in slow_answer[0].get_json()["results"]] == ["applied"]
    assert [r["status"] for r in answer.get_json()["results"]] == ["applied"]


def test_a_push_that_waited_for_its_pdas_previous_one_compares_with_its_last_scan(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 6 across two pushes of one PDA, the second waiting for the first (a retry
    over a slow link, say): the first stores seq 2 and dawdles before it commits. The
    second, seq 3 stamped before seq 2, must be compared with seq 2 although it read
    the device's lock row only after waiting (on PostgreSQL its statement's snapshot
    is from before the wait, without seq 2: ``DeviceState.at_max_seq``)."""
    receipt = ingest_module._BatchIngest._receipt

    def slow_receipt(self: Any, tracker: Any) -> Any:
        answer = receipt(self, tracker)
        if tracker.max_seq == 2:
            time.sleep(0.4)
        return answer

    with committed_app.app_context():
        _, (tn,) = factories.station_with_pdas(db.session, "INV", {"inv": "PDA-INV"}, parcels=1)
        db.session.commit()
    courier = Auth(committed_app.test_client()).headers("inv", "PDA-INV")
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    first = factories.push_body("PDA-INV", [factories.event(1, tn, occurred_at=at)])
    assert committed_app.test_client().post(PUSH, json=first, headers=courier).status_code == 200
    monkeypatch.setattr(ingest_module._BatchIngest, "_receipt", slow_receipt)
    later = at + dt.timedelta(minutes=30)
    second = factories.event(2, tn, "out_for_delivery", occurred_at=later)
    earlier = later - dt.timedelta(minutes=5)
    backdated = factories.event(3, tn, "out_for_delivery", occurred_at=earlier)
    pushes = race_requests(
        committed_app,
        [
            ("POST", PUSH, factories.push_body("PDA-INV", [second]), courier),
            ("POST", PUSH, factories.push_body("PDA-INV", [backdated]), courier),
        ],
        delays=[0, 0.15],
    )
    assert [p.status_code for p in pushes] == [200, 200]
    with committed_app.app_context():
        flag = db.session.scalars(select(Flag).where(Flag.kind == "time_inversion")).one()
    assert flag.evidence["device_seqs"] == ["PDA-INV#2", "PDA-INV#3"]


def test_two_revocations_of_one_consent_at_once_revoke_it_once(committed_app: Flask) -> None:
    """The recipient taps "revoke" and the app retries: revoking twice changes nothing.
    The consent keeps the first revocation's time, reason and channel, and both
    answers say what is stored (on PostgreSQL both read it unrevoked before either
    wrote: a second reader saw the second overwrite the first in 6 rounds of 6)."""
    with committed_app.app_context():
        station = factories.station(db.session, code="RACE")
        numbers = [factories.parcel(db.session, station).tracking_no for _ in range(6)]
        factories.user(db.session, "channel", "integration")
        db.session.commit()
    channel = Auth(committed_app.test_client()).headers("channel")
    client = committed_app.test_client()
    failures = []
    for round_, tn in enumerate(numbers):
        granted = client.post(
            "/api/v1/consents",
            json={
                "tracking_no": tn,
                "method": "locker",
                "channel": "app",
                "granted_at": (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat(),
            },
            headers=channel,
        )
        assert granted.status_code == 201, granted.get_json()
        url = f"/api/v1/consents/{granted.get_json()['id']}/revoke"
        answers = race_requests(
            committed_app,
            [
                ("POST", url, {"reason": f"tap {i}", "channel": tapped}, channel)
                for i, tapped in enumerate(("app", "sms"))
            ],
        )
        stored = client.get(f"/api/v1/consents/{granted.get_json()['id']}", headers=channel)
        seen = {_revocation(a.get_json()) for a in answers}
        now = _revocation(stored.get_json())
        if [a.status_code for a in answers] != [200, 200] or seen != {now}:
            failures.append((round_, sorted(seen), now))
    assert failures == [], f"{len(failures)} of {len(numbers)} rounds: {failures[:2]}"


def _revocation(consent: dict[str, Any]) -> tuple[Any, ...]:
    """What a revocation stores of a consent."""
    return tuple(consent[name] for name in ("revoked_at", "revoked_reason", "revoked_channel"))


@pytest.mark.parametrize("page", ["api_detail", "web_detail"])
def test_a_proof_hashing_its_images_for_an_auditor_holds_up_no_push(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    """An auditor opens a disputed proof (its detail through the API, its page): each
    image file the answer names is hashed (``integrity``), a read of megabytes on a
    slow disk (a search hashes none: ``test_web_pages.py``). On SQLite the request held
    the writers' turn from its first statement (the read is audit-logged, so it wrote),
    and every PDA's push waited for the hashing: here a write made while it hashes waited
    out the busy timeout (a 503). These now read, images hashed, in reading
    transactions and record the read apart, after it: the write goes through at once,
    and the read is on record once."""
    from sync.blobs import FileBlobStore
    from tests.courier_api.test_blobs_api import digest, image_bytes

    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="HASH")
        factories.user(session, "hash-rider", "courier", station)
        factories.user(session, "hash-auditor", "auditor")
        factories.device(session, "PDA-HASH", station)
        tracking_no = factories.parcel(session, station).tracking_no
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    auth = Auth(client)
    courier = auth.headers("hash-rider", "PDA-HASH")
    signature = image_bytes()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    pod = {"recipient_name": "Li", "signature_sha256": digest(signature)}
    events = [
        factories.event(1, tracking_no, occurred_at=at),
        factories.event(2, tracking_no, "delivered", occurred_at=at, pod=pod),
    ]
    pushed = client.post(PUSH, json=factories.push_body("PDA-HASH", events), headers=courier)
    assert pushed.status_code == 200, pushed.get_json()
    put = client.put(f"/api/v1/blobs/{digest(signature)}", data=signature, headers=courier)
    assert put.status_code == 201, put.get_json()
    auditor = auth.headers("hash-auditor")
    [found] = client.get("/api/v1/proofs", headers=auditor).get_json()["items"]
    pages = Pages(committed_app.test_client())
    assert pages.login("hash-auditor").status_code == 302
    engine = db.engine_of(committed_app)
    hashing = FileBlobStore.verify
    waited: list[float] = []

    def hashed_while_a_push_lands(self: FileBlobStore, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        with engine.begin() as writer:  # another request's push, meanwhile
            writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        waited.append(time.monotonic() - started)
        return hashing(self, *args, **kwargs)

    monkeypatch.setattr(FileBlobStore, "verify", hashed_while_a_push_lands)
    action, read = {
        "api_detail": (
            "proof_read",
            lambda: client.get(f"/api/v1/proofs/{found['event_id']}", headers=auditor),
        ),
        "web_detail": ("proof_read", lambda: pages.client.get(f"/web/proofs/{found['event_id']}")),
    }[page]
    with committed_app.app_context():
        before = db.session.scalar(
            select(func.count()).select_from(AuditEntry).where(AuditEntry.action == action)
        )

    answer = read()

    assert answer.status_code == 200, answer.get_data()[:300]
    if page == "api_detail":
        assert [image["integrity"] for image in answer.get_json()["images"]] == ["intact"]
    assert len(waited) == 1 and waited[0] < 2, waited
    with committed_app.app_context():
        after = db.session.scalar(
            select(func.count()).select_from(AuditEntry).where(AuditEntry.action == action)
        )
    assert after == before + 1


def test_a_shift_page_hashing_its_discrepancies_images_holds_up_no_push(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 19:00 a manager opens the page of a handover that does not balance: an express
    parcel left in a locker without consent, its photo shown beside the drop, hashed as
    the page is read (``sync.pages.image_states``). The page was no reading view: on
    SQLite it held the writers' turn from its first statement to its last, so every PDA's
    push waited for the whole page, its images' hashing too; here a write made while it
    hashes waited out the busy timeout (a 503). The page now reads in a reading
    transaction (an auditor's reads recorded apart, last, as a proof's page does)."""
    shift_id, pages, waited = _unbalanced_shift_hashed_while_a_push_lands(
        committed_app, monkeypatch
    )

    answer = pages.client.get(f"/web/shifts/{shift_id}")

    assert answer.status_code == 200, answer.get_data()[:300]
    assert "unauthorized locker drop" in answer.get_data(as_text=True)
    assert len(waited) == 1 and waited[0] < 2, waited


@pytest.mark.parametrize(
    ("action", "form", "refused", "typed"),
    [
        (
            "signoff",
            {"note": "checked the locker", "rejected_events": "7"},
            "Not signed off: shift ",  # its refused scans changed since
            'placeholder="What you checked">checked the locker</textarea>',
        ),
        # A closed shift's (its close form not offered again: it is closed).
        ("close", {"last_seq": "2"}, "Not closed: ", ""),
        # Seqs mistyped (the form is not offered again: none is missing).
        ("lost-seqs", {"seqs": "three", "reason": "PDA reset"}, "Not written off: ", ""),
    ],
    ids=["sign-off", "close", "write-off"],
)
def test_a_refused_action_shows_the_shift_page_again_holding_up_no_push(
    committed_app: Flask,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    form: dict[str, str],
    refused: str,
    typed: str,
) -> None:
    """At 19:00 a manager's sign-off of a handover that does not balance is refused (the
    PDA's refused scans changed since the page was read; or a close of a closed shift, a
    write-off of seqs mistyped): the page is shown again, read anew, its discrepancies'
    images hashed. It was rendered in the POST's writing transaction, rolled back and
    begun again by its first read: on SQLite the writers' turn held for the whole page,
    and a PDA's push meanwhile waited out the busy timeout (the page answered 503). The
    refused action gives its transaction back and the page is read as the GET reads it,
    in a reading transaction; the manager sees the same page, the refusal and what they
    typed."""
    shift_id, pages, waited = _unbalanced_shift_hashed_while_a_push_lands(
        committed_app, monkeypatch
    )

    answer = pages.post(f"/web/shifts/{shift_id}/{action}", **form)

    assert answer.status_code == 200, answer.get_data()[:300]
    page = answer.get_data(as_text=True)
    assert refused in page and "unauthorized locker drop" in page
    assert typed in page
    assert len(waited) == 1 and waited[0] < 2, waited
    with committed_app.app_context():
        station = db.session.scalars(select(Station).where(Station.code == "EVE")).one()
        assert station.name == "Busy"  # the push, applied


def _unbalanced_shift_hashed_while_a_push_lands(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, Pages, list[float]]:
    """A closed shift with an express parcel left in a locker without consent, its photo
    stored; its station's manager signed in to the pages. Each image the pages hash from
    then on has another request's write land as it is hashed: how long that write waited
    is appended to the list returned."""
    from sync.blobs import FileBlobStore
    from tests.courier_api.test_blobs_api import digest, image_bytes

    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="EVE")
        factories.user(session, "eve-rider", "courier", station)
        factories.user(session, "eve-manager", "station_manager", station)
        factories.device(session, "PDA-EVE", station)
        tracking_no = factories.parcel(session, station).tracking_no  # express
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    courier = Auth(client).headers("eve-rider", "PDA-EVE")
    opened = client.post("/api/v1/shifts", json={}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    photo = image_bytes()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    drop = factories.locker_drop(2, tracking_no, at)
    drop["pod"] |= {"photo_sha256": digest(photo)}
    events = [factories.event(1, tracking_no, occurred_at=at - dt.timedelta(minutes=5)), drop]
    pushed = client.post(PUSH, json=factories.push_body("PDA-EVE", events), headers=courier)
    assert pushed.status_code == 200, pushed.get_json()
    put = client.put(f"/api/v1/blobs/{digest(photo)}", data=photo, headers=courier)
    assert put.status_code == 201, put.get_json()
    closed = client.post(f"/api/v1/shifts/{shift_id}/close", json={}, headers=courier)
    assert closed.status_code == 200, closed.get_json()
    pages = Pages(committed_app.test_client())
    assert pages.login("eve-manager").status_code == 302
    engine = db.engine_of(committed_app)
    hashing = FileBlobStore.verify
    waited: list[float] = []

    def hashed_while_a_push_lands(self: FileBlobStore, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        with engine.begin() as writer:  # another request's push, meanwhile
            writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        waited.append(time.monotonic() - started)
        return hashing(self, *args, **kwargs)

    monkeypatch.setattr(FileBlobStore, "verify", hashed_while_a_push_lands)
    return shift_id, pages, waited


@pytest.mark.parametrize("route", ["api", "web"])
def test_a_proof_image_read_and_hashed_as_served_holds_up_no_push(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """A shift's page at 19:00 shows each discrepancy's photos as thumbnails, each one a
    request for the image (``/web/images/<sha256>``, as ``GET /api/v1/blobs/<sha256>``),
    its file read and hashed as it is served (up to 8 MiB). Neither was a reading view: on
    SQLite each held the writers' turn while it read the file, and a PDA's push meanwhile
    waited out the busy timeout (the image answered 503). They read in a reading
    transaction now, an auditor's read recorded apart before the bytes go out."""
    from sync.blobs import FileBlobStore
    from tests.courier_api.test_blobs_api import digest, image_bytes

    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="IMG")
        factories.user(session, "img-rider", "courier", station)
        factories.user(session, "img-manager", "station_manager", station)
        factories.device(session, "PDA-IMG", station)
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    photo = image_bytes()
    courier = Auth(client).headers("img-rider", "PDA-IMG")
    put = client.put(f"/api/v1/blobs/{digest(photo)}", data=photo, headers=courier)
    assert put.status_code == 201, put.get_json()
    engine = db.engine_of(committed_app)
    reading = FileBlobStore.read
    waited: list[float] = []

    def read_while_a_push_lands(self: FileBlobStore, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        with engine.begin() as writer:  # another request's push, meanwhile
            writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        waited.append(time.monotonic() - started)
        return reading(self, *args, **kwargs)

    if route == "api":
        headers = Auth(client).headers("img-manager")
        get = lambda: client.get(f"/api/v1/blobs/{digest(photo)}", headers=headers)  # noqa: E731
    else:
        pages = Pages(committed_app.test_client())
        assert pages.login("img-manager").status_code == 302
        get = lambda: pages.client.get(f"/web/images/{digest(photo)}")  # noqa: E731
    monkeypatch.setattr(FileBlobStore, "read", read_while_a_push_lands)

    answer = get()

    assert answer.status_code == 200, answer.get_data()[:300]
    assert answer.get_data() == photo
    assert len(waited) == 1 and waited[0] < 2, waited


def test_a_shifts_page_and_a_flags_page_answer_while_a_writer_holds_the_database(
    committed_app: Flask,
) -> None:
    """At 19:00 a manager goes from a shift's page to each of its flags and back while
    the PDAs push. Neither page was a reading view: on SQLite each queued for the one
    writers' turn behind the pushes to read a few rows, and answered 503 after the busy
    timeout of 10 s when a push held it that long. They read the last commit at once
    now, as the board does (an auditor's reads recorded apart, once rendered)."""
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="QUEUE")
        factories.user(session, "queue-boss", "station_manager", station)
        factories.user(session, "queue-rider", "courier", station)
        factories.device(session, "PDA-QUEUE", station)
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    courier = Auth(client).headers("queue-rider", "PDA-QUEUE")
    opened = client.post("/api/v1/shifts", json={"first_seq": 1}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    with committed_app.app_context():
        flag = Flag(
            station_id=station_id,
            kind="shift_not_closed",
            severity="warning",
            subject_type="shift",
            subject_key=str(shift_id),
            evidence={},
            shift_id=shift_id,
        )
        db.session.add(flag)
        db.session.commit()
        flag_id = flag.id
    pages = Pages(committed_app.test_client())
    assert pages.login("queue-boss").status_code == 302
    engine = db.engine_of(committed_app)
    with engine.begin() as writer:  # a push in progress: on SQLite, the writers' turn
        writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        started = time.monotonic()
        answers = [
            pages.client.get(f"/web/shifts/{shift_id}"),
            pages.client.get(f"/web/flags/{flag_id}"),
        ]
        waited = time.monotonic() - started
    assert [a.status_code for a in answers] == [200, 200], [a.get_data()[:300] for a in answers]
    assert waited < 6
    assert "Busy" not in answers[0].get_data(as_text=True)  # not the uncommitted name


def test_a_pdas_rejected_events_are_listed_while_a_writer_holds_the_database(
    committed_app: Flask,
) -> None:
    """A shift's page lists at most 100 of its PDA's rejected events and sends the
    manager to ``GET /api/v1/quarantine?device_id=`` for the rest. That list queued for
    SQLite's one writers' turn behind the pushes (an auditor's read is audit-logged), and
    answered 503 after the busy timeout when a push held it that long. It reads the last
    commit at once now, an auditor's read recorded apart, before the list goes out."""
    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="QUAR")
        factories.user(session, "quar-boss", "station_manager", station)
        factories.user(session, "quar-auditor", "auditor")
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    auth = Auth(client)
    manager, auditor = auth.headers("quar-boss"), auth.headers("quar-auditor")
    with committed_app.app_context():
        before = db.session.scalar(select(func.count()).select_from(AuditEntry))
    engine = db.engine_of(committed_app)
    with engine.begin() as writer:  # a push in progress: on SQLite, the writers' turn
        writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        started = time.monotonic()
        listed = client.get("/api/v1/quarantine?device_id=PDA-QUAR", headers=manager)
        waited = time.monotonic() - started
    assert listed.status_code == 200, listed.get_json()
    assert waited < 6
    read = client.get("/api/v1/quarantine?device_id=PDA-QUAR", headers=auditor)
    assert read.status_code == 200, read.get_json()
    with committed_app.app_context():
        entries = db.session.scalars(
            select(AuditEntry).where(AuditEntry.id > before).order_by(AuditEntry.id)
        ).all()
    assert [e.action for e in entries] == ["quarantine_searched"]


def test_an_auditors_reads_of_the_reading_views_are_each_recorded_once_under_their_parcels(
    committed_app: Flask,
) -> None:
    """The shift's and the flags' pages, a proof image (page and API) and ``GET
    /quarantine`` read in a reading transaction (on PostgreSQL a ``READ ONLY`` one, which
    the rolled-back tests' shared connection is not) and record an auditor's read apart,
    last (``Database.write_apart``). With real commits: each answer is given and each
    read is on record once, filed under the parcels it showed: the delivery's proof and
    its photo under its parcel, the refused drop under the parcel it names, not under
    the other."""
    from tests.courier_api.test_blobs_api import digest, image_bytes

    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="AUDR")
        factories.user(session, "audr-rider", "courier", station)
        factories.user(session, "audr-auditor", "auditor")
        factories.device(session, "PDA-AUDR", station)
        delivered = factories.parcel(session, station).tracking_no  # express
        refused = factories.parcel(session, station).tracking_no
        session.commit()
    client = committed_app.test_client()
    courier = Auth(client).headers("audr-rider", "PDA-AUDR")
    opened = client.post("/api/v1/shifts", json={}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    photo = image_bytes()
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30)
    drop = factories.locker_drop(2, delivered, at)
    drop["pod"] |= {"photo_sha256": digest(photo)}
    no_compartment = factories.event(
        3, refused, "delivered_to_locker", occurred_at=at, locker_id="L-1"
    )
    events = [factories.event(1, delivered, occurred_at=at - dt.timedelta(minutes=5)), drop]
    body = factories.push_body("PDA-AUDR", [*events, no_compartment])
    pushed = client.post(PUSH, json=body, headers=courier)
    assert [r["status"] for r in pushed.get_json()["results"]] == ["applied"] * 2 + ["rejected"]
    put = client.put(f"/api/v1/blobs/{digest(photo)}", data=photo, headers=courier)
    assert put.status_code == 201, put.get_json()
    closed = client.post(f"/api/v1/shifts/{shift_id}/close", json={}, headers=courier)
    assert closed.status_code == 200, closed.get_json()
    with committed_app.app_context():
        flag_ids = db.session.scalars(select(Flag.id).order_by(Flag.id)).all()
        before = db.session.scalar(select(func.max(AuditEntry.id))) or 0
    assert flag_ids
    pages = Pages(committed_app.test_client())
    assert pages.login("audr-auditor").status_code == 302
    auditor = Auth(client).headers("audr-auditor")
    answers = [
        pages.client.get(f"/web/shifts/{shift_id}"),
        *(pages.client.get(f"/web/flags/{flag_id}") for flag_id in flag_ids),
        pages.client.get(f"/web/images/{digest(photo)}"),
        client.get(f"/api/v1/blobs/{digest(photo)}", headers=auditor),
        client.get("/api/v1/quarantine", query_string={"device_id": "PDA-AUDR"}, headers=auditor),
    ]

    assert [a.status_code for a in answers] == [200] * len(answers), [
        a.get_data()[:300] for a in answers if a.status_code != 200
    ]
    with committed_app.app_context():
        entries = db.session.execute(
            select(AuditEntry.id, AuditEntry.action, AuditEntry.subject_key)
            .where(AuditEntry.id > before)
            .order_by(AuditEntry.id)
        ).all()
        filed: dict[int, list[str]] = {}
        for entry_id, number in db.session.execute(
            select(AuditEntryParcel.entry_id, AuditEntryParcel.tracking_no).where(
                AuditEntryParcel.entry_id > before
            )
        ):
            filed.setdefault(entry_id, []).append(number)
    shown = [(action, key, sorted(filed.get(entry_id, []))) for entry_id, action, key in entries]
    assert shown == [
        ("proofs_searched", f"shift:{shift_id}", [delivered]),
        ("parcel_read", str(shift_id), [delivered]),
        ("quarantine_searched", f"shift:{shift_id}", [refused]),
        *(("proofs_searched", f"flag:{flag_id}", [delivered]) for flag_id in flag_ids),
        ("blob_read", digest(photo), [delivered]),
        ("blob_read", digest(photo), [delivered]),
        ("quarantine_searched", "search", [refused]),
    ], shown


@pytest.mark.parametrize("page", ["board", "flag"])
def test_a_refused_decision_shows_its_page_again_holding_up_no_push(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch, page: str
) -> None:
    """A manager's clean sign-off from the board with no box checked, or a flag resolved
    without a note, is refused and its page shown again, read anew. It was read in the
    POST's writing transaction, begun again after the rollback: on SQLite the board (every
    shift of the day) or the flag's page read holding the writers' turn, and a PDA's push
    meanwhile waited out the busy timeout (the page answered 503). The refused decision
    is rolled back and its page read as its GET reads it."""
    from courier_api.web import views

    with committed_app.app_context():
        session: Session = db.session
        station = factories.station(session, code="REDO")
        factories.user(session, "redo-boss", "station_manager", station)
        factories.user(session, "redo-rider", "courier", station)
        factories.device(session, "PDA-REDO", station)
        session.commit()
        station_id = station.id
    client = committed_app.test_client()
    courier = Auth(client).headers("redo-rider", "PDA-REDO")
    opened = client.post("/api/v1/shifts", json={"first_seq": 1}, headers=courier)
    assert opened.status_code == 201, opened.get_json()
    shift_id = opened.get_json()["id"]
    with committed_app.app_context():
        flag = Flag(
            station_id=station_id,
            kind="shift_not_closed",
            severity="warning",
            subject_type="shift",
            subject_key=str(shift_id),
            evidence={},
            shift_id=shift_id,
        )
        db.session.add(flag)
        db.session.commit()
        flag_id = flag.id
    pages = Pages(committed_app.test_client())
    assert pages.login("redo-boss").status_code == 302
    engine = db.engine_of(committed_app)
    waited: list[float] = []
    read = {"board": "station_board", "flag": "flag_page"}[page]
    reading = getattr(views, read)

    def read_while_a_push_lands(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        with engine.begin() as writer:  # another request's push, meanwhile
            writer.execute(update(Station).where(Station.id == station_id).values(name="Busy"))
        waited.append(time.monotonic() - started)
        return reading(*args, **kwargs)

    monkeypatch.setattr(views, read, read_while_a_push_lands)

    if page == "board":
        answer = pages.post(f"/web/stations/{station_id}/signoffs", note="all clean")
        refused = "Nothing signed off: "
    else:
        answer = pages.post(f"/web/flags/{flag_id}/resolve", note="")
        refused = "Not resolved: say how the flag was resolved in a note"

    assert answer.status_code == 200, answer.get_data()[:300]
    assert refused in answer.get_data(as_text=True)
    assert len(waited) == 1 and waited[0] < 2, waited


def test_two_uploads_at_once_take_no_more_unnamed_images_than_the_bound(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account's images that no event names are bounded (``UNNAMED_IMAGES_PER_UPLOADER``,
    here one). Two uploads of new images at once each counted what was committed, found
    room, and both were stored (on PostgreSQL): a script with a stolen token sending its
    uploads side by side took the bound as often as it sent them at once. The count and
    the new image's rows are one turn per account: one is stored, the other refused."""
    with committed_app.app_context():
        station = factories.station(db.session, code="PICS")
        factories.user(db.session, "snapper", "courier", station)
        factories.device(db.session, "PDA-PICS", station)
        db.session.commit()
    headers = Auth(committed_app.test_client()).headers("snapper", "PDA-PICS")
    monkeypatch.setattr(blobs_module, "UNNAMED_IMAGES_PER_UPLOADER", 1)
    decoded = blobs_module.inspect_image

    def slow_decode(data: bytes) -> Any:  # after the count, before the image's rows
        time.sleep(0.5)
        return decoded(data)

    monkeypatch.setattr(blobs_module, "inspect_image", slow_decode)
    images = [image_bytes(size=(4, 4 + n)) for n in range(2)]
    barrier = threading.Barrier(len(images))
    answers: list[Any] = [None] * len(images)

    def upload(index: int) -> None:
        client = committed_app.test_client()
        barrier.wait()
        answers[index] = put(client, headers, images[index])

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201, 429], [a.get_json() for a in answers]
    with committed_app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Blob))
    assert stored == 1


def test_an_image_sent_again_while_its_first_upload_is_in_flight_is_not_refused(
    committed_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PDA over a weak signal gives up on an upload and sends the same image again
    while the first is still being stored. The second waits for the account's turn
    (``UPLOADER_LOCK_SPACE``); by then the first has stored the image, which costs
    nothing more. It counted the image against the account's bound all the same, and at
    the bound answered 429 "push the events that name them, then upload this one
    again" for an image the server held (PostgreSQL; before that lock, it found the
    image stored and answered 200)."""
    with committed_app.app_context():
        station = factories.station(db.session, code="AGAIN")
        factories.user(db.session, "resender", "courier", station)
        factories.device(db.session, "PDA-AGAIN", station)
        db.session.commit()
    headers = Auth(committed_app.test_client()).headers("resender", "PDA-AGAIN")
    monkeypatch.setattr(blobs_module, "UNNAMED_IMAGES_PER_UPLOADER", 1)
    decoded = blobs_module.inspect_image

    def slow_decode(data: bytes) -> Any:  # after the count, before the image's rows
        time.sleep(0.5)
        return decoded(data)

    monkeypatch.setattr(blobs_module, "inspect_image", slow_decode)
    image = image_bytes(size=(5, 7))
    barrier = threading.Barrier(2)
    answers: list[Any] = [None, None]

    def upload(index: int) -> None:
        client = committed_app.test_client()
        barrier.wait()
        answers[index] = put(client, headers, image)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Stored, both: 201, or 200 for the one that found it readable already.
    assert all(a.status_code in (200, 201) for a in answers), [a.get_json() for a in answers]
    with committed_app.app_context():
        stored = db.session.scalar(select(func.count()).select_from(Blob))
    assert stored == 1


def test_a_taken_pda_id_tried_at_once_from_several_tabs_is_counted_once(
    committed_app: Flask,
) -> None:
    """A manager's tries of one PDA id another station holds, sent at once (a double
    click, two tabs, a script's retries): each is a 409, and the id is counted and
    logged once, whichever try commits first: the caller's lock (PostgreSQL; SQLite's
    one writer) makes the later ones find the first's row."""
    with committed_app.app_context():
        session: Session = db.session
        own = factories.station(session, code="OWN")
        other = factories.station(session, code="OTHER")
        factories.user(session, "registrar", "station_manager", own)
        factories.device(session, "PDA-OTHER-1", other)
        session.commit()
    headers = Auth(committed_app.test_client()).headers("registrar")

    responses = race(committed_app, "/api/v1/devices", [{"device_id": "PDA-OTHER-1"}] * 4, headers)

    assert [(r.status_code, r.get_json()["code"]) for r in responses] == [
        (409, "device_exists")
    ] * 4
    with committed_app.app_context():
        session = db.session
        logged = session.scalar(
            select(func.count())
            .select_from(AuditEntry)
            .where(AuditEntry.action == "device_registration_refused")
        )
        counted = session.scalar(
            select(func.count())
            .select_from(SignInAttempt)
            .where(SignInAttempt.outcome == directory.DEVICE_IDS_TAKEN)
        )
    assert (logged, counted) == (1, 1)
