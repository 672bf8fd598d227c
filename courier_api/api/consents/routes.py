from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from flask import current_app, jsonify
from flask.views import MethodView

from courier_api.api.base import RATE_LIMITED, ApiBlueprint
from courier_api.api.consents.schemas import (
    AnsweredConsentOut,
    ConsentIn,
    ConsentListArgs,
    ConsentOut,
    ConsentPage,
    ConsentRequestIn,
    ConsentRequestListArgs,
    ConsentRequestOut,
    ConsentRequestPage,
    RevokeIn,
    consent_view,
    request_view,
)
from courier_api.api.pagination import keyset_page
from courier_api.auth import current_principal, ensure_visible
from courier_api.config import policy_of
from courier_api.extensions import db
from models import ConsentScope, Role, utcnow
from sync import audit, consent_requests, consents, directory, request_reach
from sync.errors import DomainError, InvalidInput, PermissionDenied
from sync.phones import normalize_phone
from sync.status import rejudge_for_consent, rejudge_for_refusal
from sync.tracking import TrackingNumberPolicy, normalize

blp = ApiBlueprint(
    "consents", __name__, url_prefix="/api/v1/consents", description="Recipients' consent"
)
WRITERS = (Role.INTEGRATION, Role.ADMIN)
READERS = (Role.INTEGRATION, Role.ADMIN, Role.AUDITOR, Role.STATION_MANAGER)


def consent_rules() -> consents.ConsentRules:
    config = current_app.config
    return consents.ConsentRules(
        tracking=TrackingNumberPolicy.from_patterns(config["DOMESTIC_TRACKING_PATTERNS"]),
        phone_region=config["DEFAULT_PHONE_REGION"],
    )


def _views(items: Sequence[Any]) -> list[dict[str, Any]]:
    """``consent_view`` of each, knowing which a correction voided (one query, and none
    when none of them was captured on a PDA)."""
    captured = [c.id for c in items if c.event_id is not None]
    voided = consents.voided_consents(db.session, captured) if captured else set()
    unmasked = _unmasked()
    return [consent_view(c, unmasked=unmasked, voided=c.id in voided) for c in items]


def _listed(listing: consents.ConsentListing) -> list[dict[str, Any]]:
    """A page's consents, each with when a refusal withdrew it for the parcel asked
    about (``covering``)."""
    return [
        {**view, "refused_at": listing.refused_at.get(view["id"])}
        for view in _views(listing.items)
    ]


def _view(consent: Any) -> dict[str, Any]:
    return _views([consent])[0]


def _unmasked() -> bool:
    """Phone numbers, also those typed into free text, are whole for auditors only."""
    return current_principal().role == Role.AUDITOR


@blp.route("")
class Consents(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*WRITERS)
    @blp.arguments(ConsentIn)
    @blp.response(201, AnsweredConsentOut)
    @blp.alt_response(
        200, schema=ConsentRequestOut, description="A refusal, recorded: the request"
    )
    @blp.alt_response(404, response="NOT_FOUND")
    @blp.alt_response(409, response="CONFLICT")
    def post(self, body: dict[str, Any]) -> Any:
        """Record a recipient's consent, or answer a courier's request for one

        From a recipient-facing channel (app, SMS gateway, call centre). For one
        parcel (`scope` parcel, `tracking_no`) or standing for a recipient
        (`scope` standing, `recipient_phone` and `address`, optionally one
        `station`): every parcel to that phone at that address is covered.
        `method` locker, pickup_point or any; `point_id` narrows it to one
        point. The parcels it covers are judged again at once: a flag it makes
        unnecessary is closed, and the couriers holding them hear of it in
        their pull feed.

        **Retries**: give each consent your own `client_consent_id` (your
        message or call id). A POST whose answer was lost, sent again with the
        same id and the same consent, answers the consent recorded the first
        time (201, the same id) and records nothing; the same id with another
        consent is a 409 `client_consent_id_reused`. Without it, each POST
        records a consent of its own: revoking one leaves the others in force.

        **Answering a request** (`consent.requested` webhook): send its
        `request_id` with the `channel` (and optionally `granted_at`, default
        now, not before the request was made: else a 422
        `granted_before_request`; `expires_at`, `evidence`); the parcel, method and point are the
        request's unless given (the method asked, restated without a point,
        keeps the point asked: the recipient agreed to that one); the answer
        (201) carries the request too, and its audit entry (`consent_granted`)
        names it (`request_id`).
        `granted: false` records a refusal (with an optional `reason`; on the
        audit log, `consent_refused`: it withdraws, for the parcel, the consents
        given before it, each request they granted on the audit log as
        `consent_request_withdrawn`) and answers 200 with the request; without a
        `request_id` it is a 422
        `refusal_without_request` (nothing is recorded). The courier's PDA
        hears the answer in its pull feed (`consent_request`). The same answer
        sent again changes
        nothing and answers the same (what a retried grant leaves out is taken
        as the consent's); the other answer, or a grant stating another consent
        (method, point, channel, times, evidence) or a refusal another
        `reason`, is a 409 `consent_request_answered` naming what differs; one
        after the request lapsed a 409
        `consent_request_expired`. A grant with a `client_consent_id` that a
        consent has already (sent alone, or by another answer at the same
        moment) is answered by that consent if it states the same and answers
        no other request (audit-logged as `consent_request_answered`, naming the
        request and the consent); otherwise a 409 `client_consent_id_reused` says
        what differs or which request it answers. A consent sent alone with the
        `client_consent_id` an answer recorded, without evidence where the answer
        sent none (its evidence is then the server's, "answer to consent request
        <id>"), is the same grant: a retry.
        """
        if body.get("request_id") is not None:
            return _answer_request(body)
        if not body.pop("granted"):  # recording it as a consent would grant what was refused
            raise InvalidInput(
                "a refusal answers a consent request: send its request_id "
                "(without one there is nothing to refuse)",
                code="refusal_without_request",
                field="granted",
            )
        body.pop("reason", None)
        for name in ("method", "granted_at"):
            if body.get(name) is None:
                raise InvalidInput(f"{name} is required", code="missing_field", field=name)
        station_code = body.pop("station", None)
        if station_code and body["scope"] != ConsentScope.STANDING:
            raise InvalidInput(
                "only a standing consent is limited to a station",
                code="station_not_expected",
                field="station",
            )
        station_id = (
            directory.get_station_by_code(session=db.session, code=station_code).id
            if station_code
            else None
        )
        # The grant's audit entry is chained after the parcels are judged again (lock
        # order: flags, then the audit log), as for an answer to a request.
        with audit.deferred(db.session):
            consent, new, answered = consents.grant_once(
                session=db.session,
                draft=consents.ConsentDraft(**body, station_id=station_id),
                rules=consent_rules(),
                created_by=current_principal().user_id,
            )
            if new:  # a retry's consent was judged when it was recorded
                rejudge_for_consent(
                    session=db.session, consent=consent, policy=policy_of(current_app.config)
                )
        db.session.commit()
        # A retry may be of a consent an answer to a request recorded (its id's): the
        # request it answers, as the retry found it (``answered``).
        return {
            **_view(consent),
            "request": None
            if answered is None
            else request_view(answered, utcnow(), unmasked=_unmasked()),
        }, 201

    @blp.auth(*READERS)
    @blp.arguments(ConsentListArgs, location="query")
    @blp.response(200, ConsentPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List consents

        Oldest first. `active` keeps the ones in force now (granted, not
        revoked, not expired, not voided by the courier's correction of the
        event that captured it on the PDA: `voided`). `covering` a parcel: the
        consents that could cover it, each with `refused_at` when its
        recipient's refusal of a courier's request withdrew it for that parcel;
        with `active`, those that authorize a drop of it now by its station's
        PDAs, as the drop rules weigh them (not one withdrawn so, nor one
        captured on another station's PDA). `recipient_phone` gives a
        recipient's consent history: the standing consents for that phone and
        the consents of the parcels addressed to it now (only standing consents
        name a phone; a parcel's, given by SMS or captured at the door, is found
        through its parcel). Managers see their own
        station's consents, those for the parcels their station holds (a consent
        captured on a PDA before its parcel was taken in keeps the PDA's
        station) and the standing ones that hold at every station. Recipient
        phone numbers are masked except for auditors, and a manager may not search
        by `recipient_phone` (403 `role_forbidden`): a full phone tried against the
        standing consents every station lists, masked, would tell its hidden digits.
        A parcel's consents are theirs by `covering`.
        """
        phone = args.get("recipient_phone")
        if phone and not current_principal().is_cross_station:
            raise PermissionDenied(
                "a station manager may not search consents by recipient_phone: phone "
                "numbers are shown to them masked (a parcel's consents: covering)",
                code="role_forbidden",
                field="recipient_phone",
            )
        listing = consents.list_consents(
            session=db.session,
            station_id=current_principal().station_filter(args.get("station_id")),
            tracking_no=args.get("tracking_no"),
            covering=args.get("covering"),
            recipient_phone=normalize_phone(
                phone,
                default_region=current_app.config["DEFAULT_PHONE_REGION"],
                field="recipient_phone",
            )
            if phone
            else None,
            active_at=utcnow() if args.get("active") else None,
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page(_listed(listing), args["limit"], key=lambda c: c["id"])


@blp.route("/<id:consent_id>")
class ConsentById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(*READERS)
    @blp.response(200, ConsentOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, consent_id: int) -> dict[str, Any]:
        """Get a consent

        Managers read their station's consents, those for the parcels their
        station holds now, and the standing ones that hold at every station;
        any other answers what an unknown id answers (404 `consent_not_found`),
        so that it does not show it exists.
        """
        consent = consents.get(session=db.session, consent_id=consent_id)
        principal = current_principal()
        if consent.station_id is not None and not principal.can_access_station(
            consent.station_id
        ):  # the station holding its parcel now may read it too
            ensure_visible(
                consents.parcel_station(db.session, consent),
                consents.consent_not_found(consent_id),
            )
        return _view(consent)


@blp.route("/<id:consent_id>/revoke")
class RevokeConsent(MethodView):
    @blp.auth(*WRITERS)
    @blp.arguments(RevokeIn)
    @blp.response(200, ConsentOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def post(self, body: dict[str, Any], consent_id: int) -> dict[str, Any]:
        """Revoke a consent

        From now on it no longer authorizes unattended delivery; drops before
        now stay authorized. The consent keeps who revoked it (`revoked_by`,
        the signed-in user) and, when given, the recipient's `reason` and the
        `channel` they revoked through (`revoked_channel`). Revoking twice
        changes nothing: the first revocation's time, reason, user and channel
        stand. The parcels it covers are judged again and their couriers hear
        of it.
        """
        consent = consents.get(session=db.session, consent_id=consent_id)
        revocation = consents.Revocation(
            revoked_by=current_principal().user_id,
            reason=body.get("reason"),
            channel=body.get("channel"),
        )
        with audit.deferred(db.session):  # lock order: flags, then the audit log
            revoked = consent.revoked_at is None and consents.revoke(
                session=db.session, consent=consent, revocation=revocation
            )
            if revoked:
                rejudge_for_consent(
                    session=db.session, consent=consent, policy=policy_of(current_app.config)
                )
        if revoked:
            db.session.commit()
        return _view(consent)


def _answer_request(body: dict[str, Any]) -> Any:
    """``POST /consents`` with a ``request_id``: the recipient's answer to a request."""
    for name in ("scope", "recipient_phone", "address", "station"):
        if name in body and not (name == "scope" and body[name] == ConsentScope.PARCEL):
            raise InvalidInput(
                f"{name} does not go with request_id: an answer is for the request's parcel",
                code="field_not_expected",
                field=name,
            )
    request = consent_requests.get_request(session=db.session, request_id=body["request_id"])
    if body.get("tracking_no") and normalize(body["tracking_no"]) != request.tracking_no:
        raise InvalidInput(
            f"request {request.id} is for parcel {request.tracking_no}",
            code="tracking_no_mismatch",
            field="tracking_no",
        )
    now = utcnow()
    # The answer's audit entry is written after the parcel is judged again (lock order:
    # flags, then the audit log).
    with audit.deferred(db.session):
        request, consent, new = consent_requests.answer_request(
            session=db.session,
            request=request,
            answer=consent_requests.Answer(
                granted=body["granted"],
                channel=body["channel"],
                granted_at=body.get("granted_at"),
                expires_at=body.get("expires_at"),
                method=body.get("method"),
                point_id=body.get("point_id"),
                evidence=body.get("evidence"),
                reason=body.get("reason"),
                client_consent_id=body.get("client_consent_id"),
            ),
            rules=consent_rules(),
            answered_by=current_principal().user_id,
            now=now,
        )
        if consent is not None and new:
            rejudge_for_consent(
                session=db.session, consent=consent, policy=policy_of(current_app.config)
            )
        elif new:  # a refusal withdraws, for this parcel, the consents given before it
            rejudge_for_refusal(
                session=db.session,
                tracking_no=request.tracking_no,
                policy=policy_of(current_app.config),
            )
    db.session.commit()
    if consent is None:
        return jsonify(
            ConsentRequestOut().dump(request_view(request, now, unmasked=_unmasked()))
        ), 200
    return {**_view(consent), "request": request_view(request, now, unmasked=_unmasked())}, 201


@blp.route("/requests")
class ConsentRequests(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.COURIER)
    @blp.arguments(ConsentRequestIn)
    @blp.response(201, ConsentRequestOut)
    @blp.alt_response(
        200,
        schema=ConsentRequestOut,
        description="Your request asking the same is still pending: nothing sent again",
    )
    @blp.alt_response(409, response="CONFLICT")
    @blp.alt_response(429, **RATE_LIMITED)
    def post(self, body: dict[str, Any]) -> Any:
        """Ask a recipient for consent (online)

        The courier at the door, with the PDA online: the request is sent to the
        recipient's channel (`consent.requested` webhook) and lapses at
        `expires_at`. The answer comes back in the PDA's pull feed (long-poll
        `GET /sync/pull?wait=`). Offline, the PDA sends a `consent_requested`
        event instead. A parcel the station has not taken in (one of another
        station is answered alike, so that it does not show it exists), or whose
        recipient has no phone, gives a request with status `unsent`; a parcel
        delivered in person or collected from its locker (in the recipient's hands:
        nothing to ask) one with status `cancelled`, saying so, never sent.

        **Retries**: give each request your own `client_request_id` (a UUID). A
        POST whose answer was lost, sent again with it, answers the request made
        the first time (as it is now) and asks the recipient nothing again; the
        same id with another request is a 409 `client_request_id_reused`.

        **Asking again**: each request sent is a message to the recipient, so
        the same question (parcel, method, point and channel) while one is
        pending (sent, not answered, not lapsed) is not sent again: your own
        pending request answers (200, as it is now), a colleague's is a 409
        `consent_request_pending` naming it (its answer covers the parcel).
        Once it lapsed or was refused, or for another method, point or channel
        (the SMS did not arrive: ask by phone_call), ask anew. At most
        `CONSENT_REQUESTS_PER_PARCEL` requests are sent for one parcel (4 an
        hour unless configured, by any courier, online or offline); beyond, 429
        `too_many_requests` with `Retry-After` (a PDA's `consent_requested`
        event beyond, or asking a question pending, is stored, its request kept
        `unsent`, naming why). A request that would be `unsent` is never refused so.
        """
        principal = current_principal()
        assert principal.station_id is not None
        now = utcnow()
        policy = TrackingNumberPolicy.from_patterns(
            current_app.config["DOMESTIC_TRACKING_PATTERNS"]
        )
        tracking_no = _validated_tracking_no(policy, body["tracking_no"])
        draft = consent_requests.RequestDraft(
            tracking_no=tracking_no,
            method=body["method"],
            point_id=body.get("point_id"),
            channel=body.get("channel"),
            expires_at=body.get("expires_at"),
        )
        asker = consent_requests.Asker(
            principal.user_id, principal.station_id, principal.device_id
        )
        ttl = dt.timedelta(minutes=current_app.config["CONSENT_REQUEST_TTL_MINUTES"])
        request, pending = consent_requests.request_once(
            session=db.session,
            draft=draft,
            asker=asker,
            client_request_id=body.get("client_request_id"),
            ttl=ttl,
            now=now,
            per_parcel=current_app.config["CONSENT_REQUESTS_PER_PARCEL"],
        )
        db.session.commit()
        unreached = request_reach.not_reached(db.session, [request], now)
        view = request_view(
            request, now, unmasked=_unmasked(), not_reached=unreached.get(request.id)
        )
        if pending:  # the same question, pending: nothing was sent again
            return jsonify(ConsentRequestOut().dump(view)), 200
        return view

    @blp.auth(Role.COURIER, *READERS)
    @blp.arguments(ConsentRequestListArgs, location="query")
    @blp.response(200, ConsentRequestPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List consent requests

        Oldest first. Couriers see their own requests; managers their station's
        and those for the parcels their station holds now (a request keeps the
        station it was asked at when its parcel is taken in elsewhere); admins,
        auditors and integrations every station's.
        """
        principal = current_principal()
        now = utcnow()
        items = consent_requests.list_requests(
            session=db.session,
            station_id=principal.station_filter(args.get("station_id")),
            courier_id=principal.user_id if principal.role == Role.COURIER else None,
            tracking_no=args.get("tracking_no"),
            status=args.get("status"),
            now=now,
            after_id=args["after"],
            limit=args["limit"],
        )
        unmasked = _unmasked()
        unreached = request_reach.not_reached(db.session, items, now)
        return keyset_page(
            [
                request_view(r, now, unmasked=unmasked, not_reached=unreached.get(r.id))
                for r in items
            ],
            args["limit"],
            key=lambda r: r["id"],
        )


@blp.route("/requests/<id:request_id>")
class ConsentRequestById(MethodView):
    READS_ONLY = True  # its GET: courier_api.database

    @blp.auth(Role.COURIER, *READERS)
    @blp.response(200, ConsentRequestOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, request_id: int) -> dict[str, Any]:
        """Get a consent request

        Couriers read their own requests (a colleague's is a 403
        `not_your_request`), managers their station's and those for the
        parcels their station holds now. A request of another station answers
        couriers and managers what an unknown id answers (404
        `consent_request_not_found`), so that it does not show it exists.
        """
        principal = current_principal()
        request = consent_requests.get_request(session=db.session, request_id=request_id)
        unknown = consent_requests.request_not_found(request_id)
        if principal.role == Role.COURIER:
            if request.courier_id != principal.user_id:
                ensure_visible(request.station_id, unknown)
                raise PermissionDenied("another courier's request", code="not_your_request")
        elif not principal.can_access_station(request.station_id):
            # the station holding its parcel now may read it too
            ensure_visible(consents.station_holding(db.session, request.tracking_no), unknown)
        now = utcnow()
        unreached = request_reach.not_reached(db.session, [request], now)
        return request_view(
            request, now, unmasked=_unmasked(), not_reached=unreached.get(request.id)
        )


def _validated_tracking_no(policy: TrackingNumberPolicy, raw: str) -> str:
    try:
        return policy.validate(raw)
    except DomainError as error:
        raise InvalidInput(error.message, code=error.code, field="tracking_no") from None
