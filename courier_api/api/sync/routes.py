from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, g
from flask.json.provider import DefaultJSONProvider
from flask.views import MethodView

from courier_api import metrics
from courier_api.api.base import ApiBlueprint
from courier_api.api.sync.schemas import (
    IGNORED_FIELDS,
    IGNORED_FIELDS_NAMED,
    PullArgs,
    PullPage,
    PushReceipt,
    PushRequest,
)
from courier_api.auth import checked_principal, current_principal
from courier_api.config import inversion_tolerance_of, policy_of, shift_rules_of
from courier_api.extensions import db
from courier_api.limits import request_limits
from models import Role, utcnow
from sync import feed
from sync.consent_requests import effective_status, latest_for
from sync.consents import in_force
from sync.errors import LimitExceeded, PermissionDenied
from sync.events import EventRules
from sync.ingest import IngestRules, PushBatch, Pusher, batch_received, ingest
from sync.phones import mask_phone
from sync.request_reach import not_reached
from sync.tracking import TrackingNumberPolicy

log = logging.getLogger(__name__)
blp = ApiBlueprint("sync", __name__, url_prefix="/api/v1/sync", description="PDA sync")
PULL_POLL_SECONDS = 0.5  # how often a long pull looks for news
# An unknown push key the log names: one that reads as a field's name (``_field_like``).
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_DIGIT_RUN = re.compile(r"[0-9]{4}")
# How many (device, unknown key set) pairs each server process remembers having logged:
# a fleet a release ahead sends the same keys on every push.
LOGGED_KEY_SETS_KEPT = 10_000


@blp.before_request
def note_arrival() -> None:
    """The clock offset is measured against the moment the push arrived, before its
    body was read: a slow upload must not look like a PDA clock running slow."""
    g.received_at = utcnow()


# The settings ``ingest_rules`` reads: its rules are built again only when one changed.
_INGEST_SETTINGS = (
    "DOMESTIC_TRACKING_PATTERNS",
    "MAX_EVENT_AGE_DAYS",
    "CLOCK_SKEW_FLAG_SECONDS",
    "TIME_INVERSION_TOLERANCE_SECONDS",
    "CONSENT_REQUIRED_CLASSES",
    "SIGNATURE_REQUIRED_CLASSES",
    "FAR_FROM_ADDRESS_METRES",
    "CONSENT_RECORDING_GRACE_MINUTES",
    "SHIFT_PLANNED_HOURS",
    "CONSENT_REQUEST_TTL_MINUTES",
    "CONSENT_REQUESTS_PER_PARCEL",
)
_INGEST_RULES = "courier_api.ingest_rules"  # the app's extensions: (settings, rules)


def ingest_rules(app: Flask | None = None) -> IngestRules:
    """The push's rules from the app's settings, built once per process: building them
    (the domestic tracking patterns compiled, five rule objects) took about 40 us, 2 %
    of a one-scan push. Built again when a setting they read changed (tests change
    them), compared with a copy, so that a list changed in place counts too. They are
    built from that copy alone: a setting read but not in ``_INGEST_SETTINGS`` is a
    ``KeyError`` at the first push, not rules kept after it changed. ``app``: the
    current one by default."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    settings = tuple(app.config.get(name) for name in _INGEST_SETTINGS)
    kept = app.extensions.get(_INGEST_RULES)
    if kept is not None and kept[0] == settings:
        return kept[1]  # type: ignore[no-any-return]
    copied = copy.deepcopy(settings)
    rules = _built_ingest_rules(dict(zip(_INGEST_SETTINGS, copied, strict=True)))
    app.extensions[_INGEST_RULES] = (copied, rules)
    return rules


def _built_ingest_rules(config: Mapping[str, Any]) -> IngestRules:
    return IngestRules(
        events=EventRules(
            tracking=TrackingNumberPolicy.from_patterns(config["DOMESTIC_TRACKING_PATTERNS"]),
            max_age=dt.timedelta(days=config["MAX_EVENT_AGE_DAYS"]),
        ),
        clock_skew_bound=dt.timedelta(seconds=config["CLOCK_SKEW_FLAG_SECONDS"]),
        time_inversion_tolerance=inversion_tolerance_of(config),
        policy=policy_of(config),
        shifts=shift_rules_of(config),
        consent_request_ttl=dt.timedelta(minutes=config["CONSENT_REQUEST_TTL_MINUTES"]),
        consent_requests_per_parcel=config["CONSENT_REQUESTS_PER_PARCEL"],
    )


@blp.route("/push")
class Push(MethodView):
    JSON_DEPTH_PER_ITEM = True  # an event nested too deep is quarantined, not the batch
    # The sign-in check is the first statement of the push's transaction, and only
    # there (``courier_api.auth.checked_principal``): nothing before it writes.
    SIGN_IN_CHECKED_WHEN_WRITING = True

    @blp.auth(Role.COURIER)
    @blp.arguments(PushRequest)
    @blp.response(200, PushReceipt)
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(413, response="REQUEST_ENTITY_TOO_LARGE")
    @blp.alt_response(503, response="SERVICE_UNAVAILABLE")
    def post(self, body: dict[str, Any]) -> Response:
        """Push a batch of scan events

        Send what the PDA recorded, in batches of any size up to the limit, in any
        order, as often as needed. Each event gets a result at its index:
        `applied`, `duplicate` (already held), or `rejected` with a code (kept in
        quarantine for the station; re-sending it gets the same answer). Re-sending
        a batch with the same `batch_id` and the same events, in any order, returns
        the same receipt (each result at the event's index in the retry) and changes
        nothing; the same `batch_id` with other events is a 409 `batch_id_reused`:
        send them under a new `batch_id` (those already held come back `duplicate`).
        A top-level key the server does not know is ignored, not refused: the
        receipt's `warnings` name it (`unknown_field_ignored`); an unknown field
        inside an event still rejects that event. A 413 (too many events, or a body too
        large: nothing stored) names the limit in `limit` (`max`, `unit`): split the
        queue into parts that fit, oldest first, each under a new `batch_id`. The
        sign-in states the limits beforehand (`limits`). A retry of a batch stored
        already gets its receipt even when it has more events than a limit lowered
        since; not a body over a byte limit lowered since, refused unread: split it
        as for any 413, and the events stored already come back `duplicate`, those
        refused with their first answer.

        The receipt is sent only after the batch is committed. Read its results
        before pruning: an event rejected `seq_conflict` took a seq another event
        of the PDA holds, so `acked_through_seq` may pass it though the server
        holds nothing of it. Set it apart, sign in again and send it under a new
        seq, after both the new `device_max_seq` and the highest seq the PDA has
        given (it may keep its `client_event_id`); a copy of an event sent so already,
        refused `seq_conflict` again at its old seq (a queue rebuilt), is dropped: the
        server holds it under its new seq (another new seq would make it a
        `conflicting_duplicate`). Drop every other rejected event.
        Then delete events from the PDA only up to `acked_through_seq`, and only
        events sent (one not sent yet at a seq up to it, numbered from 1 again, is not
        held: another event holds its seq);
        `missing_seqs` lists gaps the server is still waiting for. Send your queue
        oldest first: a manager may write off as lost seqs the server is waiting for
        (a PDA reset), and once it holds a seq above all it held at the write-off,
        the acknowledgement passes them, so older events still unsent behind such a
        newer one sent would be pruned. On a 503 or no
        answer at all, keep everything and send the same batch again, before any
        newer batch (its events are the older: a newer batch's receipt may pass those
        of them written off meanwhile): a replay is always safe. `clock_offset_ms`
        is the PDA clock minus the server clock; event times are corrected by it.
        """
        principal = current_principal()
        if body["device_id"] != principal.device_id:
            raise PermissionDenied(
                f"this token belongs to device {principal.device_id}; "
                "push only for the device you signed in with",
                code="device_mismatch",
                field="device_id",
            )
        # Out of their proxies once: ``courier_api.logs._start_request`` says why.
        app, ctx = current_app._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
        limit = request_limits(app).max_events_per_push
        # A retry of a batch stored under a higher limit (lowered since) gets its receipt.
        if len(body["events"]) > limit and not batch_received(
            db.session, body["device_id"], body["batch_id"]
        ):
            raise LimitExceeded(
                f"{len(body['events'])} events in one push; the limit is {limit}; nothing "
                "was stored: send them in smaller batches",
                limit=limit,
                unit="events",
                field="events",
            )
        assert principal.station_id is not None  # couriers always belong to a station
        batch = PushBatch(
            device_id=body["device_id"],
            batch_id=body["batch_id"],
            sent_at=body["sent_at"],
            events=body["events"],
        )
        pusher = Pusher(
            device_id=body["device_id"],
            station_id=principal.station_id,
            courier_id=principal.user_id,
        )
        rules = ingest_rules(app)
        # PostgreSQL may abort the push to break a deadlock with concurrent work: the
        # whole request is run again, as every request is (``CourierFlask.dispatch_request``),
        # exactly once still: nothing of the aborted run stays.
        receipt = ingest(
            session=db.session,
            batch=batch,
            pusher=pusher,
            rules=rules,
            received_at=ctx.received_at,
        )
        db.session.commit()
        # A replay is answered with the stored receipt, stamped with its first arrival.
        replayed = receipt.get("server_time") != ctx.received_at.isoformat()
        metrics.count_push(receipt, replayed=replayed)
        if body[IGNORED_FIELDS]:  # about this request, not the batch: never stored
            metrics.unknown_field_push()
            if _first_sight_of_key_set(body["device_id"], body[IGNORED_FIELDS]):
                _note_ignored_fields(body)
            receipt = {**receipt, "warnings": _ignored_field_warnings(body[IGNORED_FIELDS])}
        # The stored receipt as it is: a replay answers the same bytes, and a
        # 1,000-event receipt is not walked through the schema again. A new batch's is
        # sent as its text was stored, when that is what ``jsonify`` would send (the
        # same bytes, not encoded a second time); else ``jsonify``, its app already
        # out of ``current_app``.
        encoded = getattr(receipt, "encoded", None)
        if encoded is not None and _sends_json_as_stored(app):
            return app.response_class(f"{encoded}\n", mimetype=app.json.mimetype)
        return app.json.response(receipt)


def _sends_json_as_stored(app: Flask) -> bool:
    """Whether ``app``'s JSON responses are written as ``sync.ingest.RECEIPT_JSON``
    writes a receipt: Flask's own provider, keys sorted, ASCII only, compact (not
    indented, as in debug mode)."""
    provider = app.json
    return bool(
        type(provider) is DefaultJSONProvider
        and provider.sort_keys
        and provider.ensure_ascii
        and (provider.compact or (provider.compact is None and not app.debug))
    )


def _note_ignored_fields(body: dict[str, Any]) -> None:
    """Tell operators what the receipt's warnings tell the PDA: a field the server drops
    may be a misspelt one whose value is lost, or a fleet a release ahead. The keys are
    named as in the warnings (each quoted, so no key writes a line of its own), never
    their values, and only those that read as a field's name (``_field_like``): the PDA
    chooses the keys, and one may be data (a phone, a token) the log's filter does not
    find inside a word. The others are counted."""
    keys = body[IGNORED_FIELDS]
    shown = keys[:IGNORED_FIELDS_NAMED]
    named = [repr(key) for key in shown if _field_like(key)]
    hidden = len(shown) - len(named)
    more = len(keys) - len(shown)
    log.warning(
        "push of batch %s from device %s: %d unknown top-level field%s ignored: %s%s%s",
        body["batch_id"],
        body["device_id"],
        len(keys),
        "" if len(keys) == 1 else "s",
        ", ".join(named) or "none named",
        f"; {hidden} not named (not a field's name)" if hidden else "",
        f" and {more} more" if more > 0 else "",
    )


def _first_sight_of_key_set(device_id: str, keys: list[str]) -> bool:
    """Whether this process has not logged these unknown keys of this device yet.

    A PDA a release ahead sends its ``app_version`` with every push, and a PDA that got
    no answer sends the same batch again: logged each time, one such PDA pushing each
    scan wrote a warning line a scan, and a fleet of them buried the log it was meant
    to show. Each device's key set is logged once per server process (the counter
    still counts every request); a new key, or another device, is logged again. The
    keys are remembered by digest, the latest ``LOGGED_KEY_SETS_KEPT`` pairs."""
    seen: OrderedDict[bytes, None] = current_app.extensions.setdefault(
        "courier_api.logged_key_sets", OrderedDict()
    )
    lock: threading.Lock = current_app.extensions.setdefault(
        "courier_api.logged_key_sets_lock", threading.Lock()
    )
    digest = hashlib.sha256(json.dumps([device_id, keys]).encode()).digest()
    with lock:
        if digest in seen:
            seen.move_to_end(digest)
            return False
        seen[digest] = None
        if len(seen) > LOGGED_KEY_SETS_KEPT:
            seen.popitem(last=False)
        return True


def _field_like(key: str) -> bool:
    """Whether ``key`` reads as a field's name, to be named in the log: letters, digits
    and ``_ - .``, at most 64, no run of 4 digits (a phone, a PIN, a pickup code) and
    not a random-looking mix of upper and lower case and digits of 16 or more (a token).
    """
    if not _FIELD_NAME.fullmatch(key) or _DIGIT_RUN.search(key):
        return False
    mixed = any(c.isupper() for c in key) and any(c.islower() for c in key)
    return not (len(key) >= 16 and mixed and any(c.isdigit() for c in key))


def _ignored_field_warnings(keys: list[str]) -> list[dict[str, str]]:
    warnings = [
        {
            "code": "unknown_field_ignored",
            "field": key[:64],
            "message": f"the push has no field {key[:64]!r}: it was ignored (the events "
            "were taken as usual)",
        }
        for key in keys[:IGNORED_FIELDS_NAMED]
    ]
    if len(keys) > IGNORED_FIELDS_NAMED:
        warnings.append(
            {
                "code": "unknown_field_ignored",
                "message": f"{len(keys) - IGNORED_FIELDS_NAMED} more unknown fields were ignored",
            }
        )
    return warnings


@blp.route("/pull")
class Pull(MethodView):
    READS_ONLY = True  # courier_api.database: a PDA's pull holds up no push

    @blp.auth(Role.COURIER)
    @blp.arguments(PullArgs, location="query")
    @blp.response(200, PullPage)
    @blp.alt_response(400, response="BAD_REQUEST")
    @blp.alt_response(410, response="GONE")
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Pull changes for this PDA

        Without a cursor, the parcels the signed-in courier holds and still has
        to deal with; then, with the `next_cursor` of each page, what changed
        since: parcels assigned to them and their updates, oldest first, and
        `parcel_removed` tombstones (reassigned away). A parcel may come twice;
        apply entries in order. Pull until `has_more` is false, and keep the last
        `next_cursor` for next time. A 410 with code `cursor_reset` means the
        cursor is not known here, or is not the signed-in courier's (another
        courier's pulls on a shared PDA, or another station's): drop the local
        parcel list and pull again without a cursor (unsent events stay on the
        PDA and are pushed as usual).
        A malformed cursor is a 400.

        **Long poll**: with a cursor and `wait=N`, when nothing is new the answer
        waits up to N seconds (at most `MAX_PULL_WAIT_SECONDS`) for a change, e.g. the answer
        to a consent request (a `consent_request` entry; each parcel lists this
        courier's latest `consent_requests` and the `consents` in force). An
        empty page after the wait means nothing happened: pull again. At most
        `MAX_PULL_WAITERS` pulls wait at a time in each server process; beyond
        that a pull is answered at once (pull again shortly). A pull without a
        cursor never waits: its page, the parcels held, is answered at once, empty
        for a PDA holding none, with the cursor to wait on.
        """
        principal = current_principal()
        assert principal.station_id is not None
        cursor = feed.Cursor.parse(args.get("cursor"))
        # Without a cursor the page is the parcels the courier holds now, which is an
        # answer even when empty (a PDA starting fresh holding nothing): never waited
        # for. Only news after a cursor is.
        wait = (
            0 if cursor is None else min(args["wait"], current_app.config["MAX_PULL_WAIT_SECONDS"])
        )
        waiting = wait > 0 and _waiting_room().acquire(blocking=False)
        try:
            page = _read_feed(principal, cursor, args["limit"], wait if waiting else 0)
        finally:
            if waiting:
                _waiting_room().release()
        now = utcnow()
        parcels = [item.parcel for item in page.changes if item.parcel is not None]
        consents = in_force(db.session, parcels, now, principal.station_id)
        requests = latest_for(
            db.session,
            courier_id=principal.user_id,
            tracking_nos=[parcel.tracking_no for parcel in parcels],
        )
        unreached = not_reached(
            db.session, [r for listed in requests.values() for r in listed], now
        )
        return {
            "changes": [
                {
                    "kind": item.kind,
                    "tracking_no": item.tracking_no,
                    "parcel": _pda_parcel(
                        item.parcel,
                        consents.get(item.tracking_no, []),
                        requests.get(item.tracking_no, []),
                        now,
                        unreached,
                    )
                    if item.parcel is not None
                    else None,
                }
                for item in page.changes
            ],
            "next_cursor": str(page.next_cursor),
            "has_more": page.has_more,
        }


def _read_feed(
    principal: Any, cursor: feed.Cursor | None, limit: int, wait: float
) -> feed.FeedPage:
    """A page of the feed; when it is empty, look again until ``wait`` seconds passed."""
    deadline = time.monotonic() + wait
    while True:
        page = feed.read_page(
            session=db.session,
            station_id=principal.station_id,
            courier_id=principal.user_id,
            cursor=cursor,
            limit=limit,
        )
        if page.changes or page.has_more or time.monotonic() >= deadline:
            return page
        # Nothing new: end the transaction (a fresh snapshot next time; SQLite's lock
        # released), then look again.
        db.session.rollback()
        time.sleep(min(PULL_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        # The PDA may have been reported lost (or its account disabled: a 401) meanwhile,
        # or its courier moved to another station: this page ends, empty; the next
        # pull reads as who the courier is now.
        if checked_principal(g.token_claims) != principal:
            return page


def _waiting_room() -> threading.BoundedSemaphore:
    """This process's places for long pulls: a waiting PDA holds a server thread, and
    pushes and sign-ins must always find one."""
    room: threading.BoundedSemaphore = current_app.extensions.setdefault(
        "courier_api.pull_waiters",
        threading.BoundedSemaphore(current_app.config["MAX_PULL_WAITERS"]),
    )
    return room


def _pda_parcel(
    parcel: Any,
    consents: list[Any],
    requests: list[Any],
    now: dt.datetime,
    unreached: dict[int, str],
) -> dict[str, Any]:
    return {
        "tracking_no": parcel.tracking_no,
        "service_class": parcel.service_class,
        "recipient_name": parcel.recipient_name,
        "recipient_phone": mask_phone(parcel.recipient_phone),
        "address": parcel.address,
        "lat": parcel.lat,
        "lon": parcel.lon,
        "status": parcel.status,
        "status_at": parcel.status_at,
        "consents": [
            {"method": c.method, "point_id": c.point_id, "expires_at": c.expires_at}
            for c in consents
        ],
        "consent_requests": [
            {
                "id": r.id,
                "client_event_id": r.client_event_id,
                "status": effective_status(r, now),
                "method": r.method,
                "point_id": r.point_id,
                "expires_at": r.expires_at,
                "answered_at": r.answered_at,
                "revoked_at": r.revoked_at,
                "not_reached": unreached.get(r.id),
            }
            for r in requests
        ],
    }
