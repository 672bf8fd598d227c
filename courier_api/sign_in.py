"""Signing in with a password, behind the sign-in rate limits (``sync.sign_in_limits``).

The API (``POST /api/v1/auth/token``) and the pages (``POST /web/login``) both sign
in through ``sign_in_with_password``, so neither is a way around the limits.
"""

from __future__ import annotations

from flask import current_app, request

from courier_api import metrics
from courier_api.config import sign_in_limits_of
from courier_api.extensions import db
from models import utcnow
from sync import sign_in_limits
from sync.accounts import SignIn, authenticate
from sync.errors import AuthenticationFailed, DomainError


def client_address() -> str | None:
    """The client's address: the connection's peer, or with ``TRUSTED_PROXY_HOPS`` set,
    what that many proxies in front of the service put in ``X-Forwarded-For`` (werkzeug's
    ``ProxyFix``, installed by ``create_app``). Never the header otherwise: anyone
    can write it."""
    return request.remote_addr


def sign_in_with_password(username: str, password: str, device_id: str | None) -> SignIn:
    """``sync.accounts.authenticate``, counted against the rate limits.

    Commits the attempt and its outcome on its own, success included (with whatever
    else the sign-in changed): a caller that answers without committing, like a page
    refusing the role, must not leave the attempt pending, which counts as a failure.
    Raises ``RateLimited`` (from ``sync.errors``) when a limit refuses the attempt,
    before the password is checked.
    """
    config = current_app.config
    limits = sign_in_limits_of(config)
    attempt_id = None
    if limits.active:
        keys = sign_in_limits.AttemptKeys.of(
            secret=config["JWT_SECRET"].encode(), username=username, address=client_address()
        )
        admission = sign_in_limits.admit(
            session=db.session, keys=keys, limits=limits, now=utcnow()
        )
        db.session.commit()
        if admission.refusal is not None:
            metrics.sign_in("limited")
            raise admission.refusal
        attempt_id = admission.attempt_id
    try:
        signed_in = authenticate(
            session=db.session,
            username=username,
            password=password,
            device_id=device_id,
            password_hash_method=config["PASSWORD_HASH_METHOD"],
        )
    except DomainError as error:
        # Only a wrong username or password is a failure: the other refusals (a disabled
        # account, a courier's device) come after the password was found right.
        wrong = isinstance(error, AuthenticationFailed) and error.code == "invalid_credentials"
        if attempt_id is not None:
            db.session.rollback()
            sign_in_limits.settle(
                session=db.session, attempt_id=attempt_id, password_was_right=not wrong
            )
            db.session.commit()
        metrics.sign_in("failed" if wrong else "refused")
        raise
    if attempt_id is not None:
        sign_in_limits.settle(session=db.session, attempt_id=attempt_id, password_was_right=True)
    db.session.commit()
    metrics.sign_in("ok")
    return signed_in
