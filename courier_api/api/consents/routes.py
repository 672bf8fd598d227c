from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView

from courier_api.api.base import ApiBlueprint
from courier_api.api.consents.schemas import (
    ConsentIn,
    ConsentListArgs,
    ConsentOut,
    ConsentPage,
    RevokeIn,
    consent_view,
)
from courier_api.api.pagination import keyset_page
from courier_api.auth import current_principal, ensure_station_access
from courier_api.config import policy_of
from courier_api.extensions import db
from models import ConsentScope, Role, utcnow
from sync import consents, directory
from sync.errors import InvalidInput
from sync.phones import normalize_phone
from sync.status import rejudge_for_consent
from sync.tracking import TrackingNumberPolicy

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


def _view(consent: Any) -> dict[str, Any]:
    return consent_view(consent, unmasked=current_principal().role == Role.AUDITOR)


@blp.route("")
class Consents(MethodView):
    @blp.auth(*WRITERS)
    @blp.arguments(ConsentIn)
    @blp.response(201, ConsentOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record a recipient's consent

        From a recipient-facing channel (app, SMS gateway, call centre). For one
        parcel (`scope` parcel, `tracking_no`) or standing for a recipient
        (`scope` standing, `recipient_phone` and `address`, optionally one
        `station`): every parcel to that phone at that address is covered.
        `method` locker, pickup_point or any; `point_id` narrows it to one
        point. The parcels it covers are judged again at once: a flag it makes
        unnecessary is closed, and the couriers holding them hear of it in
        their pull feed.
        """
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
        consent = consents.grant(
            session=db.session,
            draft=consents.ConsentDraft(**body, station_id=station_id),
            rules=consent_rules(),
            created_by=current_principal().user_id,
        )
        rejudge_for_consent(
            session=db.session, consent=consent, policy=policy_of(current_app.config)
        )
        db.session.commit()
        return _view(consent)

    @blp.auth(*READERS)
    @blp.arguments(ConsentListArgs, location="query")
    @blp.response(200, ConsentPage)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List consents

        Oldest first. `active` keeps the ones in force now (granted, not
        revoked, not expired). Managers see their own station's consents and the
        standing ones that hold at every station. Recipient phone numbers are
        masked except for auditors.
        """
        phone = args.get("recipient_phone")
        items = consents.list_consents(
            session=db.session,
            station_id=current_principal().station_filter(args.get("station_id")),
            tracking_no=args.get("tracking_no"),
            recipient_phone=normalize_phone(
                phone, default_region=current_app.config["DEFAULT_PHONE_REGION"]
            )
            if phone
            else None,
            active_at=utcnow() if args.get("active") else None,
            after_id=args["after"],
            limit=args["limit"],
        )
        return keyset_page([_view(c) for c in items], args["limit"], key=lambda c: c["id"])


@blp.route("/<id:consent_id>")
class ConsentById(MethodView):
    @blp.auth(*READERS)
    @blp.response(200, ConsentOut)
    @blp.alt_response(404, response="NOT_FOUND")
    def get(self, consent_id: int) -> dict[str, Any]:
        """Get a consent"""
        consent = consents.get(session=db.session, consent_id=consent_id)
        if consent.station_id is not None:
            ensure_station_access(consent.station_id)
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
        now stay authorized. Revoking twice changes nothing. The parcels it
        covers are judged again and their couriers hear of it.
        """
        consent = consents.get(session=db.session, consent_id=consent_id)
        if consent.revoked_at is None:
            consents.revoke(session=db.session, consent=consent, reason=body.get("reason"))
            rejudge_for_consent(
                session=db.session, consent=consent, policy=policy_of(current_app.config)
            )
            db.session.commit()
        return _view(consent)
