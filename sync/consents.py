"""Recipients' consent to unattended delivery: granted, revoked, and which ones apply.

A consent is for one parcel, or standing for a recipient's phone number and
address (then it covers every parcel to that phone at that address, at one
station or, without a station, at all). Consents come from recipient-facing
channels through the API, or are captured on a PDA as ``consent_captured``
events (those authorize only drops by PDAs of the capturing PDA's station:
``sync.rules.counts_at_station``). Granting or revoking one re-judges the parcels
it covers, so a flag it makes unnecessary closes (and one it no longer prevents
opens) at once.

A consent recorded or revoked through the API is written to the audit log as well
(``consent_granted``, ``consent_revoked``): it decides whether a locker drop was
authorized, so an auditor settling a dispute can tell a consent row changed since
from the one recorded. One captured on a PDA is its event, stored as sent.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, CompoundSelect, Row, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from models import (
    Consent,
    ConsentChannel,
    ConsentMethod,
    ConsentRequest,
    ConsentRequestStatus,
    ConsentScope,
    EventType,
    FeedKind,
    Parcel,
    ScanEvent,
    utcnow,
)
from sync import audit, feed, outbox, request_reach
from sync.errors import Conflict, InvalidInput, NotFound
from sync.events import canonical_point
from sync.phones import normalize_phone
from sync.projection import voided_in_sql
from sync.rules import (
    ConsentFact,
    Stay,
    counts_at_station,
    held_at_station,
    in_force_at,
    parcel_stays,
)
from sync.sql import IN_CHUNK, Prebuilt, among_param, chunks, created_once
from sync.tracking import TrackingNumberPolicy, normalize

_NOT_WORD = re.compile(r"[\W_]+")
# Scripts written without spaces between words: Han (CJK ideographs, their extensions and
# compatibility forms), hiragana and katakana.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_BESIDE_UNSPACED = re.compile(rf"(?<=[{_UNSPACED}]) | (?=[{_UNSPACED}])")
MAX_POINT_LENGTH = 64  # a consent's or a request's point_id, as stored
# A consent granted "in the future" is a clock error of the channel, not a promise.
FUTURE_TOLERANCE = dt.timedelta(minutes=5)
# What ``_fact`` reads of a consent (and ``consents_for`` of a standing one), read as
# plain rows: a push judges its parcels with consents and changes none.
FACT_COLUMNS = (
    Consent.id,
    Consent.scope,
    Consent.method,
    Consent.point_id,
    Consent.granted_at,
    Consent.expires_at,
    Consent.revoked_at,
    Consent.device_id,
    Consent.seq,
    Consent.captured_at_station_id,
    Consent.created_at,
    Consent.tracking_no,
    Consent.station_id,
    Consent.recipient_phone,
    Consent.address_key,
)
# Built once (``sync.sql.Prebuilt`` says why): every push judges its parcels with it.
# The parcels' own consents (parameter ``numbers``) and the standing consents of their
# recipients' phones (``phones``): only standing consents name a phone.
CONSENTS_OF_PARCELS = Prebuilt(
    lambda dialect: select(*FACT_COLUMNS).where(
        or_(
            among_param(dialect, Consent.tracking_no, "numbers"),
            among_param(dialect, Consent.recipient_phone, "phones"),
        )
    )
)


def address_key(address: str) -> str:
    """An address as compared: NFKC, case-folded, punctuation and spacing folded, and no
    space beside a Chinese or Japanese character (``_BESIDE_UNSPACED``).

    Chinese is written without spaces between words, and people and forms put them
    anywhere ("北京市 朝阳区 建国路 1 号"): the sender's manifest and the recipient's app
    need not agree. Between words in Latin letters a space still counts."""
    folded = unicodedata.normalize("NFKC", address).casefold()
    spaced = _NOT_WORD.sub(" ", folded).strip()
    return _BESIDE_UNSPACED.sub("", spaced)[:400]


@dataclass(frozen=True)
class ConsentDraft:
    scope: ConsentScope
    method: ConsentMethod
    channel: ConsentChannel
    granted_at: dt.datetime
    tracking_no: str | None = None
    recipient_phone: str | None = None
    address: str | None = None
    point_id: str | None = None
    expires_at: dt.datetime | None = None
    evidence: str | None = None
    station_id: int | None = None  # standing consents: limited to one station, or None
    # The channel's own id for it: a retry with it records nothing new (``grant_once``).
    client_consent_id: str | None = None


@dataclass(frozen=True)
class ConsentRules:
    tracking: TrackingNumberPolicy
    phone_region: str | None


def grant(
    *,
    session: Session,
    draft: ConsentDraft,
    rules: ConsentRules,
    created_by: int | None,
    now: dt.datetime | None = None,
    request_id: int | None = None,
) -> Consent:
    """Record a consent from a recipient-facing channel (validated here). ``request_id``:
    the courier's request it answers (``sync.consent_requests.answer``), named in its
    audit entry: the consent's own evidence is the channel's text, which need not say."""
    now = now or utcnow()
    consent = Consent(
        **_stated(session, draft, rules, now),
        client_consent_id=draft.client_consent_id,
        created_by=created_by,
        created_at=now,  # when it was recorded: the rules compare it with drops
    )
    session.add(consent)
    session.flush()
    audit.append(
        session=session,
        actor_id=created_by,
        action="consent_granted",
        subject_type="consent",
        subject_key=str(consent.id),
        details={
            "scope": consent.scope.value,
            "method": consent.method.value,
            "point_id": consent.point_id,
            "channel": consent.channel.value,
            "granted_at": _iso(consent.granted_at),
            "expires_at": _iso(consent.expires_at),
            "recorded_at": _iso(consent.created_at),
            "tracking_no": consent.tracking_no,
            "recipient_phone": consent.recipient_phone,
            "address": consent.address,
            "station_id": consent.station_id,
            "evidence": consent.evidence,
            **({} if request_id is None else {"request_id": request_id}),
            # A time ahead of the recording, as the channel's clock said it (``granted_by``)
            **(
                {}
                if consent.granted_at == draft.granted_at
                else {"granted_at_sent": _iso(draft.granted_at)}
            ),
            **(
                {}
                if consent.client_consent_id is None
                else {"client_consent_id": consent.client_consent_id}
            ),
        },
        tracking_no=consent.tracking_no,  # None: a standing consent, of no one parcel
    )
    return consent


def answer_evidence(request_id: int) -> str:
    """The evidence a consent answering a courier's request is recorded with when the
    channel sends none: the server's words, not the channel's."""
    return f"answer to consent request {request_id}"


class Recorded(NamedTuple):
    """What ``grant_once`` answers: the consent, whether this call recorded it, and for a
    retry the courier's request that consent answers, if any (read once)."""

    consent: Consent
    new: bool
    answers: ConsentRequest | None = None


def grant_once(
    *,
    session: Session,
    draft: ConsentDraft,
    rules: ConsentRules,
    created_by: int | None,
    now: dt.datetime | None = None,
) -> Recorded:
    """``grant``, once per ``draft.client_consent_id`` of a recording user (``Recorded``).
    A channel that got no answer sends the same consent again; with the id it
    gave it, the retry gets the consent recorded the first time (``new`` False: nothing
    recorded, nothing to judge again), so that revoking the one it heard of revokes the
    only one. The same id with other content is a conflict, never an overwrite.

    A consent recorded with that id by the channel's answer to a courier's request (an
    answer that won a race with this POST, or came first) has the server's evidence
    when the answer sent none (``answer_evidence``): a POST sending none states the same
    there, and is answered as a retry (rule 2 compares what the channel said; the
    server's words are not the channel's). Evidence the channel did send is compared.

    Two retries at once: the second answers the first's consent (``created_once``)."""
    if draft.client_consent_id is None:
        return Recorded(
            grant(session=session, draft=draft, rules=rules, created_by=created_by, now=now),
            True,
        )
    now = now or utcnow()
    _stated(session, draft, rules, now)  # a retry is validated as the first was
    client_consent_id = draft.client_consent_id
    consent, new = created_once(
        session,
        lambda: recorded_as(session, created_by, client_consent_id),
        lambda: grant(session=session, draft=draft, rules=rules, created_by=created_by, now=now),
    )
    if new:
        return Recorded(consent, True)
    answered = request_answered_by(session, consent.id)
    if draft.evidence is None and answered is not None:
        if consent.evidence == answer_evidence(answered.id):
            draft = replace(draft, evidence=consent.evidence)
    differing = differing_from(session, consent, draft, rules, now)
    if differing:
        raise Conflict(
            f"client_consent_id {draft.client_consent_id!r} was used for consent "
            f"{consent.id}, whose {fields_differ(differing)}: send the same consent "
            "again, or a new consent with a new id",
            code="client_consent_id_reused",
            field="client_consent_id",
        )
    return Recorded(consent, False, answered)


def fields_differ(fields: Sequence[str]) -> str:
    """What a conflict says of the fields a request states otherwise than the record it
    would repeat: ``"channel differs"``, ``"method, point_id differ"``."""
    return f"{', '.join(fields)} {'differs' if len(fields) == 1 else 'differ'}"


def request_answered_by(session: Session, consent_id: int) -> ConsentRequest | None:
    """The courier's request that the consent ``consent_id`` answers, if any."""
    return session.scalar(select(ConsentRequest).where(ConsentRequest.consent_id == consent_id))


def differing_from(
    session: Session, consent: Consent, draft: ConsentDraft, rules: ConsentRules, now: dt.datetime
) -> list[str]:
    """The fields ``draft`` (a retry's, validated) states otherwise than ``consent`` (the
    first attempt's) recorded them."""
    stated = _stated(session, draft, rules, now)
    # The first attempt took a time ahead of its recording as its recording time.
    stated["granted_at"] = granted_by(draft.granted_at, consent.created_at)
    return _differing(consent, stated)


def recorded_as(
    session: Session, created_by: int | None, client_consent_id: str
) -> Consent | None:
    """The consent ``created_by`` recorded with the channel's id ``client_consent_id``."""
    return session.scalar(
        select(Consent).where(
            Consent.client_consent_id == client_consent_id,
            Consent.created_by.is_(None)
            if created_by is None
            else Consent.created_by == created_by,
        )
    )


def _differing(consent: Consent, stated: dict[str, Any]) -> list[str]:
    """The fields of ``stated`` (``_stated``'s) that ``consent`` does not have alike. A
    parcel consent's station is its parcel's, not the sender's word: not compared."""
    return [
        name
        for name, value in stated.items()
        if name != "address_key"
        and not (name == "station_id" and consent.scope == ConsentScope.PARCEL)
        and getattr(consent, name) != value
    ]


def _stated(
    session: Session, draft: ConsentDraft, rules: ConsentRules, now: dt.datetime
) -> dict[str, Any]:
    """The consent's columns as ``draft`` states them, validated and normalized: its
    parcel's tracking number and station, or a standing one's E.164 phone, address and
    station, and when it was granted (``granted_by``)."""
    point_id = point_named(draft.method, draft.point_id)
    if draft.granted_at > now + FUTURE_TOLERANCE:
        raise InvalidInput(
            "granted_at is in the future", code="granted_in_future", field="granted_at"
        )
    if draft.expires_at is not None and draft.expires_at <= draft.granted_at:
        raise InvalidInput(
            "expires_at must be after granted_at",
            code="expires_before_granted",
            field="expires_at",
        )
    values: dict[str, Any] = {}
    if draft.scope == ConsentScope.PARCEL:
        if not draft.tracking_no:
            raise InvalidInput(
                "a parcel consent names its tracking number; a standing one (every parcel "
                'to a phone at an address) is sent with "scope": "standing"',
                code="tracking_no_required",
                field="tracking_no",
            )
        tracking_no = rules.tracking.validate(draft.tracking_no)
        parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == tracking_no))
        if parcel is None:
            raise NotFound(f"no parcel {tracking_no}", code="parcel_not_found")
        values = {"tracking_no": tracking_no, "station_id": parcel.station_id}
    else:
        if not draft.recipient_phone or not draft.address or not draft.address.strip():
            raise InvalidInput(
                "a standing consent names the recipient's phone and address",
                code="recipient_required",
                field="recipient_phone" if not draft.recipient_phone else "address",
            )
        values = {
            "recipient_phone": normalize_phone(
                draft.recipient_phone, default_region=rules.phone_region, field="recipient_phone"
            ),
            "address": draft.address.strip(),
            "address_key": address_key(draft.address),
            "station_id": draft.station_id,
        }
    return {
        "scope": draft.scope,
        "method": draft.method,
        "point_id": point_id,
        "channel": draft.channel,
        "granted_at": granted_by(draft.granted_at, now),
        "expires_at": draft.expires_at,
        "evidence": draft.evidence,
        **values,
    }


def _iso(at: dt.datetime | None) -> str | None:
    """A time in an audit entry's details, spelt as the log spells its own."""
    return None if at is None else audit.iso(at)


def granted_by(granted_at: dt.datetime, recorded_at: dt.datetime) -> dt.datetime:
    """When a consent from a recipient channel was granted, at the latest: as the channel
    says, but no later than it was recorded here. A time ahead of that (accepted up to
    ``FUTURE_TOLERANCE``) is the channel's clock running ahead: kept as sent, the consent
    was in force for no drop (nor on any PDA) until the server's clock caught up, and a
    drop just after it was recorded was judged ``consent_after_drop``."""
    return min(granted_at, recorded_at)


def point_named(method: ConsentMethod, point_id: str | None) -> str | None:
    """A consent's (or a request's) point as a PDA's drop names it
    (``sync.events.canonical_point``: trimmed, upper-case), so that the rules find it the
    same point. A blank one names none, and is refused rather than taken for any point
    of the method; a point needs a method that has points."""
    if point_id is None:
        return None
    point = canonical_point(point_id)
    if not point:
        raise InvalidInput("point_id is blank", code="blank_point_id", field="point_id")
    if len(point) > MAX_POINT_LENGTH:  # "ß" is "SS": upper case may be longer
        raise InvalidInput(
            f"point_id is longer than {MAX_POINT_LENGTH} characters in upper case",
            code="text_too_long",
            field="point_id",
        )
    if method == ConsentMethod.ANY:
        raise InvalidInput(
            "a specific point needs method locker or pickup_point",
            code="point_without_method",
            field="point_id",
        )
    return point


@dataclass(frozen=True)
class Revocation:
    """Who revoked a consent (a user id), and what the revoking request said: the
    recipient's reason and the channel through which they revoked, when given."""

    revoked_by: int | None
    reason: str | None = None
    channel: ConsentChannel | None = None


def revoke(*, session: Session, consent: Consent, revocation: Revocation) -> bool:
    """Revoke ``consent`` unless it is revoked already; whether this call revoked it.

    One guarded update: of two revocations at once (an app's retry, a double tap),
    the second waits for the first's commit, then finds it revoked and changes
    nothing, so the time, reason, actor and channel stored are the first's and its
    parcels are judged again once. ``consent`` is refreshed to what is stored.

    The courier's request it answered, if any, reads ``revoked`` from then on
    (``revoked_requests``).
    """
    revoked = session.execute(
        update(Consent)
        .where(Consent.id == consent.id, Consent.revoked_at.is_(None))
        .values(
            revoked_at=utcnow(),
            revoked_reason=revocation.reason,
            revoked_by=revocation.revoked_by,
            revoked_channel=revocation.channel,
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(consent)
    if not revoked.rowcount:
        return False
    audit.append(
        session=session,
        actor_id=revocation.revoked_by,
        action="consent_revoked",
        subject_type="consent",
        subject_key=str(consent.id),
        details={
            "revoked_at": _iso(consent.revoked_at),
            "reason": consent.revoked_reason,
            "channel": consent.revoked_channel.value if consent.revoked_channel else None,
            "granted_at": _iso(consent.granted_at),
            "tracking_no": consent.tracking_no,
            "recipient_phone": consent.recipient_phone,
            "station_id": consent.station_id,
        },
        tracking_no=consent.tracking_no,
    )
    revoked_requests(session, consent)
    return True


def revoked_requests(session: Session, consent: Consent) -> None:
    """The request ``consent`` answered (``granted``) is ``revoked`` at the consent's
    ``revoked_at``, and its courier's PDA hears of it in its pull feed (a
    ``consent_request`` entry), as of the answer: the integrator reading the request and
    the PDA must not be told the recipient agreed after they took it back. The channel
    hears it too (``consent.request_revoked``)."""
    for request in session.scalars(
        update(ConsentRequest)
        .where(
            ConsentRequest.consent_id == consent.id,
            ConsentRequest.status == ConsentRequestStatus.GRANTED,
        )
        .values(status=ConsentRequestStatus.REVOKED, revoked_at=consent.revoked_at)
        .returning(ConsentRequest)
        .execution_options(synchronize_session="fetch")
    ):
        feed.record(
            session,
            [
                feed.FeedEntry(
                    request.station_id,
                    request.courier_id,
                    FeedKind.CONSENT_REQUEST,
                    request.tracking_no,
                )
            ],
        )
        announce_revoked(session, request, consent, utcnow())


def announce_revoked(
    session: Session, request: ConsentRequest, consent: Consent, now: dt.datetime
) -> None:
    """``consent.request_revoked``: the consent that answered ``request`` is revoked."""
    announce_outcome(
        session,
        request,
        "consent.request_revoked",
        {
            "consent_id": consent.id,
            "revoked_at": consent.revoked_at,
            "reason": consent.revoked_reason,
            "channel": consent.revoked_channel,
        },
        now,
    )


def announce_outcome(
    session: Session,
    request: ConsentRequest,
    topic: str,
    data: Mapping[str, Any],
    now: dt.datetime,
) -> None:
    """Tell the channel what became of ``request`` (``topic``, one per outcome:
    ``sync.consent_requests`` says which), after its ``consent.requested`` (the parcel's
    ordering key). Its question, no longer worth sending, is due at once, so that it
    holds back neither this nor the parcel's later messages (``request_reach``)."""
    request_reach.question_due_now(session, request, now)
    outbox.announce(
        session=session,
        topic=topic,
        ordering_key=outbox.parcel_key(request.tracking_no),
        station_id=request.station_id,
        data={
            "request_id": request.id,
            "tracking_no": request.tracking_no,
            "station_id": request.station_id,
            **data,
        },
        now=now,
    )


def get(*, session: Session, consent_id: int) -> Consent:
    consent = session.get(Consent, consent_id)
    if consent is None:
        raise consent_not_found(consent_id)
    return consent


def consent_not_found(consent_id: int) -> NotFound:
    """What ``get`` answers when no consent has ``consent_id``."""
    return NotFound(f"no consent {consent_id}", code="consent_not_found")


@dataclass(frozen=True)
class ConsentListing:
    items: Sequence[Consent]
    # With ``covering``: the consents listed that its recipient's refusal of a request
    # for consent withdrew for that parcel, and when they refused.
    refused_at: dict[int, dt.datetime]


def list_consents(
    *,
    session: Session,
    station_id: int | None,
    tracking_no: str | None = None,
    covering: str | None = None,
    recipient_phone: str | None = None,
    active_at: dt.datetime | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> ConsentListing:
    """Oldest first from ``after_id``. ``station_id`` also returns standing consents that
    hold at every station, and the consents for parcels the station holds now
    (``parcel_station``). ``tracking_no``: the consents naming that parcel;
    ``covering``: every consent that could cover it (``consents_for``: its own, and the
    standing ones for its recipient and address), as the rules weigh them: with
    ``active_at``, those that authorize a drop of it then by its station's PDAs
    (``stands``: not one its recipient's refusal withdrew for it, nor one captured on
    another station's PDA); ``recipient_phone``: that recipient's consents
    (``of_phone``)."""
    query = select(Consent).where(Consent.id > after_id).order_by(Consent.id).limit(limit)
    refused_at: dict[int, dt.datetime] = {}
    if covering:
        number = normalize(covering)
        parcel = session.scalar(select(Parcel).where(Parcel.tracking_no == number))
        if parcel is not None and station_id not in (None, parcel.station_id):
            parcel = None  # another station's: its recipient is not this reader's to learn
        found = consents_for(session, [parcel]).get(number, []) if parcel is not None else []
        refused_at = {f.id: f.refused_at for f in found if f.refused_at is not None}
        if parcel is not None and active_at is not None:
            in_force_now = [f.id for f in found if stands(f, active_at, parcel.station_id)]
            query = query.where(Consent.id.in_(in_force_now))
        else:
            # Not taken in: only consents captured for it on a PDA can name it yet.
            query = query.where(
                or_(Consent.id.in_([f.id for f in found]), Consent.tracking_no == number)
            )
    if station_id is not None:
        query = query.where(
            or_(
                Consent.station_id == station_id,
                Consent.station_id.is_(None),
                held_at(Consent.tracking_no, station_id),
            )
        )
    if tracking_no:
        query = query.where(Consent.tracking_no == normalize(tracking_no))
    if recipient_phone:
        query = query.where(Consent.id.in_(of_phone(recipient_phone)))
    if active_at is not None:
        query = query.where(
            Consent.granted_at <= active_at,
            or_(Consent.revoked_at.is_(None), Consent.revoked_at > active_at),
            or_(Consent.expires_at.is_(None), Consent.expires_at > active_at),
            ~_VOIDED,
        )
    items = session.scalars(query).all()
    return ConsentListing(items, {c.id: refused_at[c.id] for c in items if c.id in refused_at})


def of_phone(phone: str) -> CompoundSelect:
    """SQL: the ids of a recipient's consents, its standing ones (only they name a phone)
    and those of the parcels addressed to that phone now (given through a channel or
    captured on a PDA). A union of two indexed look-ups: an ``OR`` of the two would make
    the planner read every consent."""
    standing = select(Consent.id).where(Consent.recipient_phone == phone)
    of_parcels = (
        select(Consent.id)
        .join(Parcel, Parcel.tracking_no == Consent.tracking_no)
        .where(Parcel.recipient_phone == phone)
    )
    return standing.union_all(of_parcels)


def parcel_station(session: Session, consent: Consent) -> int | None:
    """The station that holds the parcel a parcel consent names, now (``None``: no such
    parcel, or a standing consent).

    A consent captured on a PDA takes its parcel's station when it is recorded, or the
    PDA's when the parcel is not taken in yet; the parcel may then be taken in at
    another station, whose manager must see the consent on record for it (which
    authorizes only drops of the capturing PDA's station: ``captured_at_station_id``).
    Read when asked rather than moved at intake: an intake updating consents would
    lock them against a revocation running the other way.
    """
    if consent.scope != ConsentScope.PARCEL or not consent.tracking_no:
        return None
    return station_holding(session, consent.tracking_no)


def station_holding(session: Session, tracking_no: str) -> int | None:
    """The station that holds the parcel now (``None``: not taken in)."""
    return session.scalar(select(Parcel.station_id).where(Parcel.tracking_no == tracking_no))


def held_at(tracking_no: Any, station_id: int) -> ColumnElement[bool]:
    """SQL: the parcel of ``tracking_no`` (a column) is held at ``station_id`` now."""
    return exists().where(Parcel.tracking_no == tracking_no, Parcel.station_id == station_id)


def covered_parcels(session: Session, consent: Consent) -> list[str]:
    """Tracking numbers of the parcels this consent applies to. One limited to a station
    applies to the parcels that are or were at that station (``consents_for``): a drop
    there is judged by it after the parcel moved on."""
    if consent.scope == ConsentScope.PARCEL:
        return [consent.tracking_no] if consent.tracking_no else []
    query = select(
        Parcel.tracking_no, Parcel.address, Parcel.station_id, Parcel.earlier_stations
    ).where(Parcel.recipient_phone == consent.recipient_phone)
    return [
        tn
        for tn, address, station_id, earlier in session.execute(query)
        if address_key(address) == consent.address_key
        and (consent.station_id is None or consent.station_id in parcel_stays(station_id, earlier))
    ]


def consents_for(session: Session, parcels: Iterable[Any]) -> dict[str, list[ConsentFact]]:
    """The consents that could apply to each parcel (rows with tracking_no, station_id,
    recipient_phone, address, earlier_stations, consent_refusals), oldest first: its
    own, and standing ones for its recipient's phone and address, at every station or at
    one it has been at (then holding only while it was there:
    ``sync.rules.parcel_stays``), each withdrawn for the parcel by a refusal after it
    (``withdrawn_by_refusals``). One statement per chunk of parcels
    (``CONSENTS_OF_PARCELS``)."""
    parcels = list(parcels)
    found: dict[str, list[ConsentFact]] = defaultdict(list)
    for chunk in chunks(parcels, IN_CHUNK // 2):  # up to two parameters a parcel
        numbers = {p.tracking_no for p in chunk}
        by_recipient: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for p in chunk:
            if p.recipient_phone:
                by_recipient[(p.recipient_phone, address_key(p.address))].append(p)
        wanted = {
            "numbers": sorted(numbers),
            "phones": sorted({phone for phone, _ in by_recipient}),
        }
        for consent in CONSENTS_OF_PARCELS.execute(session, wanted):
            if consent.scope != ConsentScope.STANDING:
                if consent.tracking_no in numbers:
                    found[consent.tracking_no].append(_fact(consent))
                continue
            for parcel in by_recipient.get((consent.recipient_phone, consent.address_key), ()):
                if consent.station_id is None:
                    found[parcel.tracking_no].append(_fact(consent))
                elif stays := parcel_stays(parcel.station_id, parcel.earlier_stations).get(
                    consent.station_id
                ):
                    found[parcel.tracking_no].append(_fact(consent, at_station=tuple(stays)))
    refusals = {p.tracking_no: p.consent_refusals for p in parcels if p.consent_refusals}
    for tracking_no, facts in found.items():
        facts.sort(key=lambda fact: fact.id)
        if tracking_no in refusals:
            facts[:] = withdrawn_by_refusals(facts, refusals[tracking_no])
    return _without_voided(session, found)


def withdrawn_by_refusals(
    facts: Sequence[ConsentFact], refusals: Sequence[str]
) -> list[ConsentFact]:
    """A parcel's consents after its recipient refused a courier's request for consent
    (``refusals``: when, ISO times): each one granted before a refusal is revoked, for
    this parcel, at the first refusal after its grant. A standing consent the recipient
    said "no, ring the bell" to for this parcel authorizes no drop of it after that;
    one granted after the refusal (they changed their mind) does."""
    times = sorted(dt.datetime.fromisoformat(at) for at in refusals)
    withdrawn = []
    for fact in facts:
        refused = next((at for at in times if fact.granted_at < at), None)
        if refused is not None and (fact.revoked_at is None or refused < fact.revoked_at):
            fact = replace(fact, revoked_at=refused, refused_at=refused)
        withdrawn.append(fact)
    return withdrawn


def consents_by_id(session: Session, ids: Iterable[int]) -> dict[int, Consent]:
    """The consents with these ids, a statement per chunk of them."""
    wanted = sorted(set(ids))
    return {
        c.id: c
        for chunk in chunks(wanted)
        for c in session.scalars(select(Consent).where(Consent.id.in_(chunk)))
    }


def _without_voided(
    session: Session, found: dict[str, list[ConsentFact]]
) -> dict[str, list[ConsentFact]]:
    """Drop consents captured by an event a correction voided: a mis-tapped consent was
    never given (the correction re-judges the parcel, whatever order they arrive in)."""
    captured = [c.id for facts in found.values() for c in facts if c.device_id is not None]
    voided = voided_consents(session, captured)
    if not voided:
        return found
    return {tn: [c for c in facts if c.id not in voided] for tn, facts in found.items()}


def voided_consents(session: Session, consent_ids: Sequence[int]) -> set[int]:
    """Those of these consents captured on a PDA by an event a later correction of the
    PDA voided: they authorize nothing."""
    voided: set[int] = set()
    for chunk in chunks(sorted(set(consent_ids))):
        voided |= set(session.scalars(select(Consent.id).where(Consent.id.in_(chunk), _VOIDED)))
    return voided


_CAPTURE = aliased(ScanEvent, name="capture")
# The consent's capturing event was voided (never true of one recorded by a channel).
_VOIDED = exists().where(_CAPTURE.id == Consent.event_id, voided_in_sql(_CAPTURE))


def _fact(consent: Row[Any], at_station: tuple[Stay, ...] | None = None) -> ConsentFact:
    """A consent (a plain row of ``FACT_COLUMNS``) as the rules judge it;
    ``at_station``: for one limited to a station, when the parcel was there."""
    return ConsentFact(
        id=consent.id,
        method=consent.method,
        point_id=consent.point_id,
        granted_at=consent.granted_at,
        expires_at=consent.expires_at,
        revoked_at=consent.revoked_at,
        device_id=consent.device_id,
        seq=consent.seq,
        captured_at_station=consent.captured_at_station_id,
        recorded_at=consent.created_at,
        at_station=at_station,
    )


def capture(session: Session, events: Iterable[dict[str, Any]]) -> list[Consent]:
    """Consents captured on PDAs: one per stored ``consent_captured`` event (row dicts
    as ``sync.ingest.event_row`` builds them, with their ``id``).

    Each is the parcel's station's, as a consent asked for online is, whichever
    station's courier captured it; the PDA's station's for a parcel not taken in. It
    keeps the PDA's station as well (``captured_at_station_id``): it authorizes only
    drops recorded there (``sync.rules.counts_at_station``)."""
    rows = [row for row in events if row["type"] == EventType.CONSENT_CAPTURED]
    station_of = {
        tracking_no: station_id
        for chunk in chunks(sorted({row["tracking_no"] for row in rows}))
        for tracking_no, station_id in session.execute(
            select(Parcel.tracking_no, Parcel.station_id).where(Parcel.tracking_no.in_(chunk))
        )
    }
    captured = []
    for row in rows:
        details = row["details"]["consent"]
        consent = Consent(
            scope=ConsentScope.PARCEL,
            station_id=station_of.get(row["tracking_no"], row["station_id"]),
            tracking_no=row["tracking_no"],
            method=ConsentMethod(details["method"]),
            point_id=details.get("point_id"),
            channel=ConsentChannel(details["channel"]),
            granted_at=row["occurred_at"],
            evidence=details.get("evidence"),
            event_id=row["id"],
            device_id=row["device_id"],
            seq=row["seq"],
            captured_at_station_id=row["station_id"],
            created_by=row["courier_id"],
            created_at=row["received_at"],  # recorded with its push (``granted_before``)
        )
        session.add(consent)
        captured.append(consent)
    session.flush()
    return captured


def in_force(
    session: Session, parcels: Iterable[Any], at: dt.datetime, station_id: int
) -> dict[str, list[ConsentFact]]:
    """The consents that authorize unattended delivery of each parcel at ``at`` by a PDA
    of ``station_id`` (one captured on another station's PDA does not:
    ``sync.rules.counts_at_station``)."""
    return {
        tracking_no: [c for c in facts if stands(c, at, station_id)]
        for tracking_no, facts in consents_for(session, parcels).items()
    }


def stands(consent: ConsentFact, at: dt.datetime, station_id: int) -> bool:
    """Whether the consent (as ``consents_for`` gives it for a parcel) authorizes
    unattended delivery of that parcel at ``at`` by a PDA of ``station_id``: granted by
    then, neither revoked (nor withdrawn by the recipient's refusal) nor expired, the
    parcel at the station it is limited to, and not captured on another station's PDA
    (``sync.rules.counts_at_station``)."""
    return (
        consent.granted_at <= at
        and in_force_at(consent, at)
        and held_at_station(consent, at)
        and counts_at_station(consent, station_id)
    )
