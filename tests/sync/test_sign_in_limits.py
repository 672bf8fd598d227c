"""Sign-in rate limits (sync.sign_in_limits): the windows, on the database, with a clock."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import SignInAttempt
from sync.sign_in_limits import (
    LIMITED,
    AttemptKeys,
    Charge,
    Limit,
    SignInLimits,
    address_scope,
    admit,
    admit_call,
    admit_cost,
    caller_key,
    count_once,
    refusal_of,
    settle,
    window_text,
)

T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
SECRET = b"test-secret"
MINUTE = dt.timedelta(minutes=1)
DAY = Limit(2, dt.timedelta(hours=24))  # the PDA ids a manager's window holds in these tests
DEVICE_TAKEN = "device_taken"
TOO_MANY_IDS = "too_many_device_ids_taken"


def keys(username: str = "courier1", address: str = "203.0.113.7") -> AttemptKeys:
    return AttemptKeys.of(secret=SECRET, username=username, address=address)


def attempt(
    session: Session,
    limits: SignInLimits,
    at: dt.datetime,
    *,
    right: bool,
    username: str = "courier1",
    address: str = "203.0.113.7",
) -> int | None:
    """One attempt: the Retry-After of its refusal, or None when it was let through."""
    admission = admit(session=session, keys=keys(username, address), limits=limits, now=at)
    if admission.refusal is not None:
        return admission.refusal.retry_after
    assert admission.attempt_id is not None
    settle(session=session, attempt_id=admission.attempt_id, password_was_right=right)
    return None


def only(**limits: Limit) -> SignInLimits:
    """These sign-in limits and no other."""
    unset: dict[str, Limit | None] = dict.fromkeys(
        ("failures_per_username", "attempts_per_address", "failures_per_address")
    )
    return SignInLimits(**{**unset, **limits})


def user_only(count: int = 3, minutes: int = 15) -> SignInLimits:
    return only(failures_per_username=Limit(count, dt.timedelta(minutes=minutes)))


def caller(user_id: str, kind: str = DEVICE_TAKEN) -> str:
    return caller_key(secret=SECRET, kind=kind, caller=user_id)


def spent(charge: Charge, code: str = TOO_MANY_IDS) -> int:
    """The units a call was charged, or minus the Retry-After of its refusal, which
    charged nothing."""
    if charge.refusal is not None:
        assert charge.units == 0 and charge.refusal.code == code
        return -charge.refusal.retry_after
    return charge.units


def ids_refusal(
    session: Session, key: str, at: dt.datetime, forgiven: tuple[str, ...] = ()
) -> Charge | None:
    """The manager ``key``'s window of PDA ids found at other stations, as
    ``sync.directory.register_device`` checks it: its refusal (nothing charged), or None."""
    refusal = refusal_of(
        session=session,
        kind=DEVICE_TAKEN,
        key=key,
        limit=DAY,
        now=at,
        what="too many ids taken",
        code=TOO_MANY_IDS,
        forgiven=forgiven,
    )
    return None if refusal is None else Charge(0, refusal)


def id_taken(
    session: Session, key: str, subject: str, at: dt.datetime = T0, forgiven: tuple[str, ...] = ()
) -> int:
    """A PDA id found at another station, as ``register_device`` counts it: the window
    checked, then the id counted once in it. ``spent``'s answer."""
    refused = ids_refusal(session, key, at, forgiven)
    if refused is not None:  # a counted subject's call too: refused alike, whatever it is
        return spent(refused)
    return count_once(
        session=session, kind=DEVICE_TAKEN, key=key, subject=subject, limit=DAY, now=at
    )


def test_limit_syntax() -> None:
    assert Limit.parse("10/900") == Limit(10, dt.timedelta(seconds=900))
    assert Limit.parse(" OFF ") is None
    assert str(Limit(5, dt.timedelta(minutes=1))) == "5/60"
    for bad in ("10", "10/", "/60", "0/60", "10/0", "-1/60", "ten/60", "10/60s"):
        with pytest.raises(ValueError):
            Limit.parse(bad)


def test_addresses_are_grouped_as_one_client() -> None:
    assert address_scope("203.0.113.7") == "203.0.113.7"
    # An IPv6 subscriber gets a whole /64: it is one client, whatever address it picks.
    assert address_scope("2001:db8:1:2:aaaa::1") == address_scope("2001:db8:1:2:ffff::9")
    assert address_scope("2001:db8:1:2::1") != address_scope("2001:db8:1:3::1")
    assert address_scope("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_scope(None) == "unknown"
    # Keys are keyed hashes: neither the username nor the address is stored.
    assert "courier1" not in keys().username and "203.0.113" not in keys().address
    assert keys("Courier1 ").username == keys("courier1").username


def test_failures_per_username_refuse_exactly_at_the_limit(session: Session) -> None:
    limits = user_only(count=3)
    for i in range(3):
        assert attempt(session, limits, T0 + i * MINUTE, right=False) is None
    # The 4th attempt is refused, the right password too, until the first failure
    # (T0) is 15 minutes old: at T0 + 3 min that is 12 minutes away.
    assert attempt(session, limits, T0 + 3 * MINUTE, right=True) == 12 * 60
    assert attempt(session, limits, T0 + 14 * MINUTE + dt.timedelta(seconds=59.5), right=True) == 1
    # Refused attempts are not failures: they do not push the window on.
    assert attempt(session, limits, T0 + 15 * MINUTE, right=True) is None
    # One failure left the window, and the success took no place: one more failure
    # fills it again (T0+1, T0+2, T0+15); the next waits for T0+1 to leave it.
    assert attempt(session, limits, T0 + 15 * MINUTE, right=False) is None
    assert attempt(session, limits, T0 + 15 * MINUTE, right=True) == 60


def test_successes_do_not_count_as_failures(session: Session) -> None:
    limits = user_only(count=2)
    for i in range(10):
        assert attempt(session, limits, T0 + i * dt.timedelta(seconds=1), right=True) is None
    assert attempt(session, limits, T0 + MINUTE, right=False) is None
    assert attempt(session, limits, T0 + MINUTE, right=True) is None


def test_a_pending_attempt_counts_as_a_failure(session: Session) -> None:
    """Concurrent guesses: while a password is being checked, its attempt already holds a
    place, so the limit cannot be passed by sending many at once."""
    limits = user_only(count=2)
    first = admit(session=session, keys=keys(), limits=limits, now=T0)
    second = admit(session=session, keys=keys(), limits=limits, now=T0)
    third = admit(session=session, keys=keys(), limits=limits, now=T0)
    assert first.refusal is None and second.refusal is None
    assert third.refusal is not None and third.refusal.retry_after == 15 * 60


def test_pending_attempts_count_against_the_address_too(session: Session) -> None:
    """Guesses at many usernames sent at once from one address cannot overshoot its
    failure limit while their passwords are being checked."""
    limits = only(failures_per_address=Limit(2, dt.timedelta(minutes=15)))
    admitted = [
        admit(session=session, keys=keys(f"user{i}"), limits=limits, now=T0) for i in range(3)
    ]
    assert [a.refusal is None for a in admitted] == [True, True, False]


def test_usernames_are_limited_independently(session: Session) -> None:
    limits = user_only(count=2)
    for _ in range(2):
        attempt(session, limits, T0, right=False, username="courier1")
    assert attempt(session, limits, T0, right=True, username="courier1") is not None
    assert attempt(session, limits, T0, right=True, username="courier2") is None
    # From another address too: the limit is the username's, wherever the guesses come from.
    assert attempt(session, limits, T0, right=True, address="198.51.100.1") is not None


def test_attempts_per_address_count_everything_and_spare_other_addresses(
    session: Session,
) -> None:
    limits = only(attempts_per_address=Limit(5, MINUTE))
    for i in range(5):  # five PDAs behind one NAT address, all signing in fine
        assert attempt(session, limits, T0, right=True, username=f"c{i}") is None
    assert attempt(session, limits, T0 + dt.timedelta(seconds=20), right=True) == 40
    # An address refused by its attempt limit stores nothing: its rows stay bounded.
    stored = session.scalar(
        select(func.count()).where(SignInAttempt.address_key == keys().address)
    )
    assert stored == 5
    assert attempt(session, limits, T0, right=True, address="198.51.100.1") is None
    assert attempt(session, limits, T0 + MINUTE, right=True) is None


def test_failures_per_address_slow_spraying_across_usernames(session: Session) -> None:
    limits = only(
        failures_per_username=Limit(3, dt.timedelta(minutes=15)),
        failures_per_address=Limit(4, dt.timedelta(minutes=15)),
    )
    for i in range(4):  # one password tried against four accounts
        assert attempt(session, limits, T0, right=False, username=f"user{i}") is None
    assert attempt(session, limits, T0, right=False, username="user9") == 15 * 60
    # Refused attempts are stored as such, and are not failures.
    outcomes = session.scalars(select(SignInAttempt.outcome).order_by(SignInAttempt.id)).all()
    assert outcomes[-1] == LIMITED
    # Another address is not concerned.
    assert attempt(session, limits, T0, right=True, address="198.51.100.1") is None


def test_old_attempts_are_purged_as_new_ones_arrive(session: Session) -> None:
    limits = user_only(count=100, minutes=15)
    for i in range(5):
        attempt(session, limits, T0 + i * MINUTE, right=False, username=f"old{i}")
    attempt(session, limits, T0 + 30 * MINUTE, right=True, username="new")
    assert session.scalar(select(func.count()).select_from(SignInAttempt)) == 1


def test_a_call_limited_per_caller_shares_the_table_but_no_sign_in_rule(
    session: Session,
) -> None:
    """``admit_call`` (the audit log's full walks): at most N per caller in its window,
    refusals not stored, freed as the oldest leaves; its rows counted by no sign-in rule
    (their address is the caller's key) and kept past the sign-ins' shorter window."""
    hour = Limit(2, dt.timedelta(hours=1))
    key = caller("7", "audit_verify")

    def call(at: dt.datetime, who: str = key) -> int | None:
        refusal = admit_call(
            session=session,
            kind="audit_verify",
            key=who,
            limit=hour,
            now=at,
            what="too many walks",
            code="too_many_verifications",
        )
        assert refusal is None or refusal.code == "too_many_verifications"
        return None if refusal is None else refusal.retry_after

    assert call(T0) is None and call(T0 + 10 * MINUTE) is None
    assert call(T0 + 20 * MINUTE) == 40 * 60
    assert call(T0 + 20 * MINUTE, caller("8", "audit_verify")) is None
    # A sign-in 30 minutes on purges what its 15-minute window no longer counts, and no
    # more; the calls count towards no sign-in limit of any address.
    every_attempt = SignInLimits(*[Limit(1, 15 * MINUTE)] * 3)
    assert attempt(session, every_attempt, T0 + 30 * MINUTE, right=True) is None
    assert call(T0 + 59 * MINUTE) == 60
    assert call(T0 + 60 * MINUTE) is None  # the first left the window
    assert call(T0 + 61 * MINUTE) == 9 * 60
    outcomes = session.scalars(select(SignInAttempt.outcome)).all()
    assert sorted(outcomes) == ["audit_verify"] * 3 + ["ok"]  # T0's purged, refusals not kept


def test_a_call_costing_units_spends_a_budget_and_is_given_no_more_than_is_left(
    session: Session,
) -> None:
    """``admit_cost`` (the audit log's checks, in entries read): a call is charged what
    it asks, at least one unit and at most those left; refused, nothing charged, once
    none are left, until the window frees the oldest call's units."""
    budget = Limit(5, dt.timedelta(hours=1))
    key = caller("7", "audit_entries")
    offered: list[int] = []

    def call(at: dt.datetime, wants: int) -> int:
        def cost(left: int) -> int:
            offered.append(left)
            return wants

        charge = admit_cost(
            session=session,
            kind="audit_entries",
            key=key,
            limit=budget,
            now=at,
            cost=cost,
            what="too many entries",
            code="too_many_verifications",
        )
        return spent(charge, "too_many_verifications")

    assert call(T0, 3) == 3
    assert call(T0 + 10 * MINUTE, 0) == 1  # a call costs something
    assert call(T0 + 20 * MINUTE, 4) == 1  # no more than is left
    assert offered == [5, 2, 1]
    assert call(T0 + 30 * MINUTE, 1) == -30 * 60  # until T0's three leave the window
    assert offered == [5, 2, 1]  # a refused call is not asked its cost
    assert call(T0 + 60 * MINUTE, 9) == 3
    rows = select(func.count()).select_from(SignInAttempt)
    assert session.scalar(rows.where(SignInAttempt.outcome == "audit_entries")) == 5


def test_a_call_about_one_subject_is_counted_once_per_window(session: Session) -> None:
    """``count_once`` past ``refusal_of`` (a PDA id found at another station): a subject
    the caller's window holds already is let through uncharged, however often it comes;
    another subject is charged, up to the limit, then every call is refused, a counted
    subject's too; a subject whose row left the window is charged again. Another
    caller's rows are theirs."""
    key, other = caller("7"), caller("8")
    assert [id_taken(session, key, "PDA-A", T0 + n * MINUTE) for n in range(5)] == [1, 0, 0, 0, 0]
    assert id_taken(session, key, "PDA-B", T0 + 10 * MINUTE) == 1
    full = -(24 * 60 - 11) * 60  # until T0's PDA-A leaves the window
    assert id_taken(session, key, "PDA-A", T0 + 11 * MINUTE) == full  # refused alike
    assert id_taken(session, key, "PDA-C", T0 + 11 * MINUTE) == full
    assert id_taken(session, other, "PDA-A", T0 + 12 * MINUTE) == 1
    assert id_taken(session, key, "PDA-A", T0 + 24 * 60 * MINUTE) == 1  # its first row left
    rows = select(func.count()).select_from(SignInAttempt)
    assert session.scalar(rows.where(SignInAttempt.outcome == DEVICE_TAKEN)) == 3


def test_a_subject_forgiven_counts_for_nothing_and_only_its_callers(session: Session) -> None:
    """``forgiven`` subjects (PDA ids now at the caller's station) count for nothing in
    the caller's window while they are forgiven: a full window has room again, the
    subjects not forgiven still count, and another caller's charge for the same subject
    stands. Nothing is deleted: a subject no longer forgiven (the PDA moved away again)
    counts again, as it did before."""
    key, other = caller("7"), caller("8")
    refused = -24 * 60 * 60  # every call at T0: until T0's rows leave the window

    def call(subject: str, who: str = key, forgiven: tuple[str, ...] = ()) -> int:
        return id_taken(session, who, subject, forgiven=forgiven)

    assert [call("PDA-A"), call("PDA-B"), call("PDA-C")] == [1, 1, refused]
    assert [call("PDA-A", other), call("PDA-B", other)] == [1, 1]
    forgiven = ("PDA-A", "PDA-X")
    assert call("PDA-C", forgiven=forgiven) == 1  # PDA-A's room
    assert call("PDA-D", forgiven=forgiven) == refused  # PDA-B and PDA-C fill it
    assert call("PDA-C", other, forgiven=()) == refused  # the other's PDA-A still counts
    assert call("PDA-D") == refused  # PDA-A no longer forgiven: three in a window of two
    assert call("PDA-A") == refused  # refused alike, counted or not

    def refusal(*forgiven: str) -> bool:
        return ids_refusal(session, key, T0, forgiven) is not None

    assert [refusal(), refusal("PDA-A"), refusal("PDA-A", "PDA-B")] == [True, True, False]


def test_a_window_reads_as_a_person_would_say_it() -> None:
    """A day read "1440 minutes" in the 429 of a manager's registrations
    (``DEVICE_IDS_TAKEN_PER_MANAGER``, 10/86400): whole hours beyond the first read in
    hours, whole days beyond the first in days; the other limits' windows as before."""
    texts = {
        seconds: window_text(dt.timedelta(seconds=seconds))
        for seconds in (1, 45, 60, 90, 600, 900, 3600, 5400, 7200, 86400, 90000, 604800)
    }
    assert texts == {
        1: "1 second",
        45: "45 seconds",
        60: "1 minute",
        90: "90 seconds",
        600: "10 minutes",
        900: "15 minutes",
        3600: "60 minutes",
        5400: "90 minutes",
        7200: "2 hours",
        86400: "24 hours",
        90000: "25 hours",
        604800: "7 days",
    }


def test_no_limits_means_nothing_stored(session: Session) -> None:
    limits = SignInLimits(None, None, None)
    assert not limits.active
    admission = admit(session=session, keys=keys(), limits=limits, now=T0)
    assert admission.refusal is None
