from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

import sync.accounts as accounts
from models import DeviceStatus, User
from sync import directory
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


def test_a_hash_of_another_method_is_made_again_on_sign_in_so_a_wrong_password_costs_as_much(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``PASSWORD_HASH_METHOD`` changed (scrypt to pbkdf2: 0.2 s a check, then
    0.6 s), an account kept its old hash: a wrong password for it was checked against
    scrypt, a name nobody has against pbkdf2, and the time told which accounts exist,
    for good. A right password is hashed again with the configured method, the account
    otherwise unchanged: its tokens stay valid."""
    station = factories.station(session)
    user = factories.user(session, "m1", "station_manager", station)
    version = user.credentials_version
    assert user.password_hash.startswith("pbkdf2:sha256:1000$")
    checked: list[str] = []
    real_check = accounts.check_password_hash

    def spy(pwhash: str, password: str) -> bool:
        checked.append(pwhash.split("$", 1)[0])
        return real_check(pwhash, password)

    monkeypatch.setattr(accounts, "check_password_hash", spy)
    configured = "pbkdf2:sha256:1500"

    def sign_in(username: str, password: str) -> None:
        accounts.authenticate(
            session=session,
            username=username,
            password=password,
            device_id=None,
            password_hash_method=configured,
        )

    with pytest.raises(AuthenticationFailed):
        sign_in("m1", "wrong-password")
    assert user.password_hash.startswith("pbkdf2:sha256:1000$")  # a wrong one changes nothing
    sign_in("m1", factories.PASSWORD)
    assert user.password_hash.startswith(f"{configured}$")
    assert user.credentials_version == version
    checked.clear()
    for username in ("m1", "nobody"):
        with pytest.raises(AuthenticationFailed):
            sign_in(username, "wrong-password")
    assert checked == [configured, configured]  # the same work, known name or not
    sign_in("m1", factories.PASSWORD)
    assert user.password_hash.startswith(f"{configured}$")


@pytest.mark.postgres_only
def test_a_password_changed_while_a_sign_in_checks_the_old_one_is_not_written_over(
    committed_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL, two connections. A manager signs in with the old password (an account
    hashed with another method than the configured one) while an admin sets a new one,
    say because the old one leaked: the admin's change commits during the sign-in's
    hash check (a second or so of scrypt or pbkdf2). The sign-in hashed the old password
    again and wrote it over the new hash, so the old password signed in again and the
    new one was refused, though the change was audit-logged and revoked the tokens. The
    sign-in's hash is written only over the hash it checked."""
    from courier_api.extensions import db

    sessions = sessionmaker(bind=db.engine_of(committed_app), expire_on_commit=False)
    with sessions() as setup:
        station = factories.station(setup, code="RHSH")
        user_id = factories.user(setup, "rehashed", "station_manager", station).id
        admin_id = factories.user(setup, "rehash-admin", "admin").id
        setup.commit()
    new_password = "changed-after-a-leak-1"
    real_check = accounts.check_password_hash

    def check_while_the_admin_changes_it(pwhash: str, password: str) -> bool:
        with sessions() as admin:
            directory.update_user(
                session=admin,
                user=admin.get_one(User, user_id),
                changed_by=admin_id,
                password=new_password,
                password_hash_method="pbkdf2:sha256:1000",
            )
            admin.commit()
        return real_check(pwhash, password)

    monkeypatch.setattr(accounts, "check_password_hash", check_while_the_admin_changes_it)
    with sessions() as signing_in:
        accounts.authenticate(
            session=signing_in,
            username="rehashed",
            password=factories.PASSWORD,
            device_id=None,
            password_hash_method="pbkdf2:sha256:1500",
        )
        signing_in.commit()
    monkeypatch.undo()
    with sessions() as check:
        stored = check.get_one(User, user_id).password_hash
    assert accounts.check_password_hash(stored, new_password)
    assert not accounts.check_password_hash(stored, factories.PASSWORD)


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


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (None, None),
        ("account disabled", "token_revoked"),
        ("password changed", "token_revoked"),
        ("device lost", "device_not_active"),
        ("device moved", "token_revoked"),
        ("account gone", "token_revoked"),
    ],
)
def test_the_recheck_on_plain_rows_refuses_what_the_sign_in_check_refuses(
    session: Session, change: str | None, code: str | None
) -> None:
    """``check_token_subject`` and ``load_token_subject`` decide alike."""
    station, elsewhere = factories.station(session), factories.station(session, code="ELSE")
    courier = factories.user(session, "c1", "courier", station)
    device = factories.device(session, "PDA-1", station)
    subject = {
        "user_id": courier.id,
        "device_id": device.id,
        "credentials_version": courier.credentials_version,
    }
    if change == "account disabled":
        courier.active = False
    elif change == "password changed":
        courier.credentials_version += 1
    elif change == "device lost":
        device.status = DeviceStatus.LOST
    elif change == "device moved":
        device.station_id = elsewhere.id
    elif change == "account gone":
        subject["user_id"] = courier.id + 1000
    session.flush()
    outcomes = []
    for check in (
        lambda: accounts.load_token_subject(session=session, **subject),
        lambda: accounts.check_token_subject(session.connection(), **subject),
    ):
        try:
            check()
        except AuthenticationFailed as refused:
            outcomes.append(refused.code)
        else:
            outcomes.append(None)
    assert outcomes == [code, code]


@pytest.mark.parametrize("role", ["courier", "station_manager"])
def test_the_check_on_a_plain_row_reads_whom_the_token_speaks_for(
    session: Session, role: str
) -> None:
    """``check_token_subject`` gives what ``load_token_subject`` loads: the account, and
    a courier's device (none for other roles)."""
    station = factories.station(session)
    user = factories.user(session, "u1", role, station)
    device = factories.device(session, "PDA-1", station)
    session.flush()
    subject = {
        "user_id": user.id,
        "device_id": device.id,
        "credentials_version": user.credentials_version,
    }
    loaded_user, loaded_device = accounts.load_token_subject(session=session, **subject)
    checked = accounts.check_token_subject(session.connection(), **subject)
    assert (checked.user_id, checked.role, checked.station_id) == (
        loaded_user.id,
        loaded_user.role,
        loaded_user.station_id,
    )
    assert checked.device_id == (loaded_device.id if loaded_device else None)
    assert (checked.device_id is not None) == (role == "courier")
