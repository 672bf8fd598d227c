"""Rate limits on signing in, shared by every worker and replica through the database.

Three rules, each "at most N in any window of S seconds" (a sliding window over
the stored attempts):

* **failed sign-ins per username** — what stops guessing one account's password.
  Once reached, *every* attempt for that username is refused, the right password
  too, until the oldest failure leaves the window: a guesser learns nothing from
  a 429. Unknown usernames are counted the same way, so the limit says nothing
  about which accounts exist.
* **attempts per client address** (all of them) — caps what one machine costs the
  server (each attempt hashes a password on purpose slowly);
* **failed sign-ins per client address** — slows password spraying (one password
  tried against many usernames), which the per-username rule cannot see.

The per-address limits are deliberately loose: a station's PDAs usually share
one NAT address and all sign in at shift start.

An attempt is taken in two steps: ``admit`` (before the password is checked)
counts what the window holds and stores the attempt as ``pending``, or refuses it;
``settle`` records how it ended. A pending attempt counts as a failure for its
username, so concurrent guesses cannot slip past the limit; on PostgreSQL the
keys are locked (advisory locks) while counting, SQLite writes one at a time.
Attempts older than the longest window are deleted as new ones arrive.

Other costly calls are limited per caller by the same windows, in the same table
(``admit_call``): their rows carry their own kind as outcome and the caller's key in
place of both the username's and the address's, so no sign-in rule counts them, and
each kind's rows are deleted by its own window. A call that costs more than others
(a verification reading thousands of audit entries) spends units of a budget, a row
each (``admit_cost``). A call about a subject (a PDA id) is counted once per window
however often it comes (``refusal_of``, then ``count_once``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy import ColumnElement, delete, func, insert, select, text, update
from sqlalchemy.orm import Session

from models import SignInAttempt
from sync.errors import RateLimited

PENDING = "pending"
OK = "ok"
FAILED = "failed"
LIMITED = "limited"
SIGN_IN_OUTCOMES = (PENDING, OK, FAILED, LIMITED)
PURGE_BATCH = 500  # old rows deleted per attempt at most (amortized: each row once)
CODE = "too_many_sign_in_attempts"


@dataclass(frozen=True)
class Limit:
    """At most ``count`` in any ``window``."""

    count: int
    window: dt.timedelta

    @classmethod
    def parse(cls, value: str) -> Limit | None:
        """``"10/900"``: 10 per 900 seconds; ``"off"``: no limit. ``ValueError`` otherwise."""
        value = value.strip().lower()
        if value in ("off", "none"):
            return None
        count, slash, seconds = value.partition("/")
        if not slash or not count.isdigit() or not seconds.isdigit():
            raise ValueError(f"expected COUNT/SECONDS (e.g. 10/900) or off, got {value!r}")
        if int(count) < 1 or int(seconds) < 1:
            raise ValueError(f"count and seconds must be positive, got {value!r}")
        return cls(int(count), dt.timedelta(seconds=int(seconds)))

    def __str__(self) -> str:
        return f"{self.count}/{int(self.window.total_seconds())}"


@dataclass(frozen=True)
class SignInLimits:
    failures_per_username: Limit | None = Limit(10, dt.timedelta(minutes=15))
    attempts_per_address: Limit | None = Limit(300, dt.timedelta(minutes=1))
    failures_per_address: Limit | None = Limit(100, dt.timedelta(minutes=15))

    @property
    def active(self) -> bool:
        return any(self._all())

    @property
    def longest_window(self) -> dt.timedelta:
        return max((limit.window for limit in self._all() if limit), default=dt.timedelta(0))

    def _all(self) -> tuple[Limit | None, ...]:
        return (self.failures_per_username, self.attempts_per_address, self.failures_per_address)


@dataclass(frozen=True)
class AttemptKeys:
    """The username and the client address of an attempt, as keyed hashes."""

    username: str
    address: str

    @classmethod
    def of(cls, *, secret: bytes, username: str, address: str | None) -> AttemptKeys:
        return cls(
            username=_keyed(secret, "username", normalize_username(username)),
            address=_keyed(secret, "address", address_scope(address)),
        )


def normalize_username(username: str) -> str:
    """As ``sync.accounts.authenticate`` looks it up."""
    return username.strip().lower()


def address_scope(address: str | None) -> str:
    """What one client is: an IPv4 address, or the /64 network of an IPv6 address (one
    subscriber usually gets a whole /64, and could otherwise change address per try)."""
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


def _subject_key(key: str, kind: str, subject: str) -> str:
    """A subject of ``count_once`` as its row stands for it, keyed with its caller's key."""
    return _keyed(key.encode(), kind, subject)


def _keyed(secret: bytes, scope: str, value: str) -> str:
    return hmac.new(secret, f"{scope}:{value}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Admission:
    """An attempt let through (``attempt_id``), or the refusal to raise once committed."""

    attempt_id: int | None
    refusal: RateLimited | None = None


def admit(
    *, session: Session, keys: AttemptKeys, limits: SignInLimits, now: dt.datetime
) -> Admission:
    """Count the windows and store the attempt (pending), or refuse it.

    Runs in the caller's transaction; the caller commits, then raises the refusal if
    there is one. A refused attempt is stored too (``limited``: it counts towards the
    address's attempts) unless the address's attempt limit refused it, so that an
    address can never store more than that many rows per window.
    """
    _lock_keys(session, keys)
    _purge(session, now - limits.longest_window, SIGN_IN_OUTCOMES)
    address = SignInAttempt.address_key == keys.address
    username = SignInAttempt.username_key == keys.username
    failed_or_pending = SignInAttempt.outcome.in_((FAILED, PENDING))
    refusal = _check(
        session,
        limits.attempts_per_address,
        (address,),
        now,
        "too many sign-in attempts from this address",
    )
    if refusal is not None:
        return Admission(None, refusal)
    refusal = _check(
        session,
        limits.failures_per_username,
        (username, failed_or_pending),
        now,
        "too many failed sign-ins for this username",
    ) or _check(
        session,
        limits.failures_per_address,
        (address, failed_or_pending),  # in flight counts: concurrent guesses cannot overshoot
        now,
        "too many failed sign-ins from this address",
    )
    row = SignInAttempt(
        at=now,
        username_key=keys.username,
        address_key=keys.address,
        outcome=LIMITED if refusal else PENDING,
    )
    session.add(row)
    session.flush()
    return Admission(None if refusal else row.id, refusal)


def settle(*, session: Session, attempt_id: int, password_was_right: bool) -> None:
    """Record how an admitted attempt ended (in the caller's transaction)."""
    session.execute(
        update(SignInAttempt)
        .where(SignInAttempt.id == attempt_id)
        .values(outcome=OK if password_was_right else FAILED)
    )


def caller_key(*, secret: bytes, kind: str, caller: str) -> str:
    """One caller (a user id) of calls of ``kind``, as ``admit_call`` keys it."""
    return _keyed(secret, kind, caller)


def admit_call(
    *,
    session: Session,
    kind: str,
    key: str,
    limit: Limit,
    now: dt.datetime,
    what: str,
    code: str,
) -> RateLimited | None:
    """A call of ``kind`` (at most 16 characters) by the caller ``key``
    (``caller_key``): stored and let through while the caller made fewer than
    ``limit.count`` in its window, refused otherwise (not stored: a refusal costs
    nothing, and the caller may call again once the oldest call leaves the window).

    Runs in the caller's transaction, which commits; the refusal is returned, to raise
    once committed, as ``admit``'s. The caller's calls are counted one at a time
    (PostgreSQL: an advisory lock on the key; SQLite writes one at a time).
    """
    charge = admit_cost(
        session=session,
        kind=kind,
        key=key,
        limit=limit,
        now=now,
        cost=lambda left: 1,
        what=what,
        code=code,
    )
    return charge.refusal


def refusal_of(
    *,
    session: Session,
    kind: str,
    key: str,
    limit: Limit,
    now: dt.datetime,
    what: str,
    code: str,
    forgiven: Collection[str] | Callable[[], Collection[str]] = (),
) -> RateLimited | None:
    """The refusal ``admit_call`` would return, nothing stored: for a call counted only
    by how it ends (``sync.directory``: a PDA id found in use at another station), whose
    caller is refused every call once its window is full, the one that would not count
    too. Takes the caller's lock (PostgreSQL), held to the transaction's end; every
    call of ``kind`` counts its window so (``admit_cost``, ``count_once``).

    ``forgiven``: subjects whose ``count_once`` rows count for nothing while they are
    so (``sync.directory``: PDA ids now at the caller's own station, which told them
    nothing that was not theirs to know). Their rows stay: a subject no longer forgiven
    (the PDA moved away again) counts again, as it did before. Given as a function, it
    is read under the caller's lock: on PostgreSQL, read before it, it missed what
    committed while the lock was waited for (a PDA moved to the station meanwhile)."""
    _lock(session, (key,))
    _purge(session, now - limit.window, (kind,))
    if callable(forgiven):
        forgiven = forgiven()
    where = _calls_of(key, kind)
    if forgiven:
        subject_keys = [_subject_key(key, kind, subject) for subject in forgiven]
        where = (*where, SignInAttempt.address_key.not_in(subject_keys))
    return _check(session, limit, where, now, what, code=code)


def _calls_of(key: str, kind: str) -> tuple[ColumnElement[bool], ...]:
    """The rows of the calls of ``kind`` by the caller ``key``."""
    return (SignInAttempt.username_key == key, SignInAttempt.outcome == kind)


def count_once(
    *, session: Session, kind: str, key: str, subject: str, limit: Limit, now: dt.datetime
) -> int:
    """A call about ``subject``, counted once per window, for a caller whose window
    ``refusal_of`` let through (its lock held): 1 when ``subject`` is counted now, 0 when
    the window holds it already (``sync.directory``: a PDA id found in use at another
    station, tried again, tells the caller nothing the first try did not). The row
    stands for the subject by a hash keyed with the caller's key in place of the
    address's."""
    where = _calls_of(key, kind)
    subject_key = _subject_key(key, kind, subject)
    counted = session.scalar(
        select(SignInAttempt.id)
        .where(*where, SignInAttempt.address_key == subject_key)
        .where(SignInAttempt.at > now - limit.window)
        .limit(1)
    )
    if counted is not None:
        return 0
    row = {"at": now, "username_key": key, "address_key": subject_key, "outcome": kind}
    session.execute(insert(SignInAttempt), [row])
    return 1


def record_once(
    *, session: Session, kind: str, key: str, subject: str, window: dt.timedelta, now: dt.datetime
) -> int:
    """``count_once`` for a caller bounded by nothing (its setting ``off``): under the
    caller's lock, the rows older than ``window`` purged, ``subject`` recorded once per
    ``window``, so that what its first call in a window sets off (an audit entry,
    ``sync.directory``) happens once however often the call is repeated: 1 when recorded
    now, 0 when the window holds it already."""
    _lock(session, (key,))
    _purge(session, now - window, (kind,))
    return count_once(
        session=session, kind=kind, key=key, subject=subject, limit=Limit(1, window), now=now
    )


@dataclass(frozen=True)
class Charge:
    """The units a call was charged, or the refusal to raise (nothing charged)."""

    units: int
    refusal: RateLimited | None = None


def admit_cost(
    *,
    session: Session,
    kind: str,
    key: str,
    limit: Limit,
    now: dt.datetime,
    cost: Callable[[int], int],
    what: str,
    code: str,
) -> Charge:
    """``admit_call`` for a call that costs more than one: ``limit.count`` units of a
    budget per window. While the caller's window holds fewer, ``cost`` is asked what
    the call costs given the units left (at least one), and that many units (from one
    to those left) are stored, one row each, so that the window frees them as it frees
    calls; refused otherwise, nothing stored. ``cost`` runs under the caller's lock:
    two calls of one caller never both spend the same units left."""
    refusal = refusal_of(
        session=session, kind=kind, key=key, limit=limit, now=now, what=what, code=code
    )
    if refusal is not None:
        return Charge(0, refusal)
    where = _calls_of(key, kind)
    held = session.scalar(
        select(func.count())
        .select_from(SignInAttempt)
        .where(*where, SignInAttempt.at > now - limit.window)
    )
    left = limit.count - (held or 0)
    units = min(max(cost(left), 1), left)
    row = {"at": now, "username_key": key, "address_key": key, "outcome": kind}
    session.execute(insert(SignInAttempt), [row] * units)
    return Charge(units)


def _check(
    session: Session,
    limit: Limit | None,
    where: tuple,
    now: dt.datetime,
    what: str,
    code: str = CODE,
) -> RateLimited | None:
    """A refusal when the window already holds ``limit.count`` matching attempts."""
    if limit is None:
        return None
    window = (*where, SignInAttempt.at > now - limit.window)
    held = session.scalar(select(func.count()).select_from(SignInAttempt).where(*window))
    if held is None or held < limit.count:
        return None
    # The window drops below the limit when its (held - count + 1)-th oldest attempt
    # leaves it.
    leaving = session.scalar(
        select(SignInAttempt.at)
        .where(*window)
        .order_by(SignInAttempt.at, SignInAttempt.id)
        .offset(held - limit.count)
        .limit(1)
    )
    wait = (leaving + limit.window - now).total_seconds() if leaving else 1.0
    retry_after = max(1, math.ceil(wait))
    return RateLimited(
        f"{what} (at most {limit.count} in {window_text(limit.window)}); "
        f"try again in {retry_after} seconds",
        retry_after=retry_after,
        code=code,
    )


def window_text(window: dt.timedelta) -> str:
    """A window as a refusal names it: "15 minutes", "60 minutes", "24 hours", "7 days"
    (whole hours, or days, beyond the first; a day is not "1440 minutes")."""
    seconds = int(window.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600)):
        if seconds > size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    if seconds % 60 == 0:
        minutes = seconds // 60
        return "1 minute" if minutes == 1 else f"{minutes} minutes"
    return "1 second" if seconds == 1 else f"{seconds} seconds"


def _lock_keys(session: Session, keys: AttemptKeys) -> None:
    """PostgreSQL: one attempt at a time per username and per address."""
    _lock(session, (keys.username, keys.address))


def _lock(session: Session, keys: tuple[str, ...]) -> None:
    """PostgreSQL: one transaction at a time per key (transaction-scoped advisory locks,
    taken in a fixed order so two transactions never wait on each other)."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: the transaction already holds the database's write lock
    for key in sorted({_lock_id(key) for key in keys}):
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _lock_id(key: str) -> int:
    return int.from_bytes(bytes.fromhex(key[:16]), "big", signed=True)


def _purge(session: Session, before: dt.datetime, outcomes: tuple[str, ...]) -> None:
    """Delete rows of ``outcomes`` no window counts any more (a batch at a time; rows
    another transaction is deleting are skipped rather than waited for). Each kind by
    its own window: a sign-in's shorter one must not delete the calls another counts."""
    old = (
        select(SignInAttempt.id)
        .where(SignInAttempt.at <= before, SignInAttempt.outcome.in_(outcomes))
        .order_by(SignInAttempt.at)
        .limit(PURGE_BATCH)
        .with_for_update(skip_locked=True)
    )
    session.execute(delete(SignInAttempt).where(SignInAttempt.id.in_(old.scalar_subquery())))
