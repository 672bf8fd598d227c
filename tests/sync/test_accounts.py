import pytest
from sqlalchemy.orm import Session

import sync.accounts as accounts
from sync.errors import AuthenticationFailed, InvalidInput
from tests import factories


def test_unknown_user_costs_a_hash_check_of_the_configured_method(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong username must cost what a wrong password costs: no account enumeration."""
    checked: list[str] = []
    real_check = accounts.check_password_hash

    def spy(pwhash: str, password: str) -> bool:
        checked.append(pwhash.split("$", 1)[0])
        return real_check(pwhash, password)

    monkeypatch.setattr(accounts, "check_password_hash", spy)
    with pytest.raises(AuthenticationFailed):
        accounts.authenticate(
            session=session,
            username="nobody",
            password="x" * 10,
            device_id=None,
            password_hash_method="pbkdf2:sha256:1234",
        )
    assert checked == ["pbkdf2:sha256:1234"]


def test_short_passwords_are_refused() -> None:
    with pytest.raises(InvalidInput) as raised:
        accounts.hash_password("short")
    assert raised.value.field == "password"


def test_sign_in_records_when_the_device_was_last_seen(session: Session) -> None:
    station = factories.station(session)
    factories.user(session, "c1", "courier", station)
    device = factories.device(session, "PDA-1", station)
    assert device.last_seen_at is None
    accounts.authenticate(
        session=session,
        username="c1",
        password=factories.PASSWORD,
        device_id="PDA-1",
        password_hash_method="pbkdf2:sha256:1000",
    )
    assert device.last_seen_at is not None
