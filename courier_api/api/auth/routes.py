from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.auth.schemas import RefreshRequest, TokenRequest, TokenResponse
from courier_api.api.base import RATE_LIMITED, ApiBlueprint
from courier_api.auth import REFRESH, decode_token, issue_tokens, principal_from_claims
from courier_api.extensions import db
from courier_api.sign_in import sign_in_with_password
from models import Device, User

blp = ApiBlueprint("auth", __name__, url_prefix="/api/v1/auth", description="Sign in and refresh")


def _token_response(user: User, device: Device | None) -> dict[str, Any]:
    pair = issue_tokens(user, device)
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": "Bearer",
        "expires_in": pair.expires_in,
        "refresh_expires_in": pair.refresh_expires_in,
        "role": user.role.value,
        "station_id": user.station_id,
        "device_id": device.id if device else None,
    }


@blp.route("/token")
class Token(MethodView):
    @blp.public
    @blp.arguments(TokenRequest)
    @blp.response(200, TokenResponse)
    @blp.alt_response(401, response="UNAUTHORIZED")
    @blp.alt_response(403, response="FORBIDDEN")
    @blp.alt_response(429, **RATE_LIMITED)
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Sign in

        Couriers also send `device_id`: a token is issued only for an active
        device registered at the courier's own station, and stops working when
        that device is retired or reported lost.

        Rate limited (429 `too_many_sign_in_attempts`, with `Retry-After` in
        seconds): after too many failed sign-ins for a username, every attempt
        for it is refused, the right password too, until the oldest failure is
        old enough; and per client address, all attempts and failed ones.
        """
        sign_in = sign_in_with_password(body["username"], body["password"], body.get("device_id"))
        response = _token_response(sign_in.user, sign_in.device)
        db.session.commit()
        return response


@blp.route("/refresh")
class Refresh(MethodView):
    @blp.public
    @blp.arguments(RefreshRequest)
    @blp.response(200, TokenResponse)
    @blp.alt_response(401, response="UNAUTHORIZED")
    def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """Exchange a refresh token for a new pair of tokens

        The account (and a courier's device) is checked again: a refresh token
        of a retired device or a disabled account is refused.
        """
        claims = decode_token(body["refresh_token"], expected_type=REFRESH)
        _, user, device = principal_from_claims(claims)
        return _token_response(user, device)
