from __future__ import annotations

from typing import Any

from flask.views import MethodView

from courier_api.api.auth.schemas import RefreshRequest, TokenRequest, TokenResponse
from courier_api.api.base import RATE_LIMITED, ApiBlueprint
from courier_api.auth import TokenPair, end_sign_in, exchange_refresh_token, issue_tokens
from courier_api.extensions import db
from courier_api.limits import request_limits
from courier_api.sign_in import sign_in_with_password
from models import Device, User
from sync.device_state import held_max_seq

blp = ApiBlueprint("auth", __name__, url_prefix="/api/v1/auth", description="Sign in and refresh")
# An answer holding tokens is kept by no cache on the way (RFC 6749 5.1): a station's
# proxy or a tool's browser would hand the tokens to whoever asks next.
NOT_KEPT = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _token_response(user: User, device: Device | None, pair: TokenPair) -> dict[str, Any]:
    max_seq = held_max_seq(db.session, device.id) if device else None
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": "Bearer",
        "expires_in": pair.expires_in,
        "refresh_expires_in": pair.refresh_expires_in,
        "role": user.role.value,
        "station_id": user.station_id,
        "device_id": device.id if device else None,
        "device_max_seq": max_seq,
        "limits": request_limits().announced(),
    }


@blp.route("/token")
class Token(MethodView):
    @blp.public
    @blp.arguments(TokenRequest)
    @blp.response(200, TokenResponse)
    @blp.alt_response(401, response="UNAUTHORIZED")
    @blp.alt_response(403, response="FORBIDDEN")
    @blp.alt_response(429, **RATE_LIMITED)
    def post(self, body: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Sign in

        Couriers also send `device_id`: a token is issued only for an active
        device registered at the courier's own station, and stops working when
        that device is retired or reported lost.

        The answer states the limits the server enforces on one request
        (`limits`: events per push, bytes per request body, bytes per proof
        image), the values its 413 `payload_too_large` names: a PDA sizes its
        batches and photos by them before sending, and reads them again at every
        sign-in and refresh (an operator may change them).

        Rate limited (429 `too_many_sign_in_attempts`, with `Retry-After` in
        seconds): after too many failed sign-ins for a username, every attempt
        for it is refused, the right password too, until the oldest failure is
        old enough; and per client address, all attempts and failed ones.
        """
        sign_in = sign_in_with_password(body["username"], body["password"], body.get("device_id"))
        response = _token_response(
            sign_in.user, sign_in.device, issue_tokens(sign_in.user, sign_in.device)
        )
        db.session.commit()
        return response, 200, NOT_KEPT


@blp.route("/refresh")
class Refresh(MethodView):
    @blp.public
    @blp.arguments(RefreshRequest)
    @blp.response(200, TokenResponse)
    @blp.alt_response(401, response="UNAUTHORIZED")
    def post(self, body: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
        """Exchange a refresh token for a new pair of tokens

        Each refresh token is accepted once: the answer carries the next one, which
        replaces it. Keep only the newest. The account (and a courier's device) is
        checked again: a refresh token of a retired device or a disabled account is
        refused.

        A refresh token sent again after it was used is refused (401
        `refresh_token_reused`): someone else may hold a copy, so the sign-in it
        belongs to is ended, and its newest refresh token is refused too (401
        `refresh_token_revoked`). Sign in again. The sign-in's access tokens end
        with it (401 `token_revoked`). Except: within `REFRESH_REUSE_GRACE_SECONDS`
        (default 60) of its first use, the token used last gets a new pair
        again, for a client whose answer was lost; its refresh token is the same
        next token again (the same `jti`), so either copy may be exchanged, once.
        """
        user, device, pair = exchange_refresh_token(body["refresh_token"])
        return _token_response(user, device, pair), 200, NOT_KEPT


@blp.route("/logout")
class Logout(MethodView):
    @blp.public
    @blp.arguments(RefreshRequest)
    @blp.response(204)
    @blp.alt_response(401, response="UNAUTHORIZED")
    def post(self, body: dict[str, Any]) -> tuple[str, int, dict[str, str]]:
        """Sign out

        Ends the sign-in the refresh token belongs to: its refresh tokens and its
        access tokens are refused from now on (401 `refresh_token_revoked`,
        `token_revoked`), copies of them too (a backup of the PDA), rather than
        working until they expire. Send it when the courier signs out of the PDA or
        hands it over. Ending a sign-in already ended answers 204 again.
        """
        end_sign_in(body["refresh_token"])
        return "", 204, NOT_KEPT
