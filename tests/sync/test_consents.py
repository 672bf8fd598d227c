"""Which consents could apply to a parcel (``sync.consents.consents_for``): its own, and
standing ones for its recipient's phone and address, at its station or at every one."""

import datetime as dt

from sqlalchemy.orm import Session

from models import Consent, ConsentChannel, ConsentMethod, ConsentScope
from sync.consents import address_key, consents_for, withdrawn_by_refusals
from sync.rules import ConsentFact
from tests import factories

GRANTED = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


def _consent(session: Session, **fields: object) -> int:
    consent = Consent(
        method=ConsentMethod.LOCKER,
        channel=ConsentChannel.APP,
        granted_at=GRANTED,
        **fields,
    )
    session.add(consent)
    session.flush()
    return consent.id


def _standing(session: Session, phone: str, address: str, station_id: int | None) -> int:
    return _consent(
        session,
        scope=ConsentScope.STANDING,
        recipient_phone=phone,
        address=address,
        address_key=address_key(address),
        station_id=station_id,
    )


def test_a_parcel_gets_its_own_consents_and_its_recipients_standing_ones_only(
    session: Session,
) -> None:
    here, there = factories.station(session), factories.station(session, code="ST2")
    parcel = factories.parcel(session, here)  # +8613812345678, "1 Century Ave"
    other = factories.parcel(session, here)
    no_phone = factories.parcel(session, here, phone=None)
    own = _consent(
        session, scope=ConsentScope.PARCEL, tracking_no=parcel.tracking_no, station_id=here.id
    )
    _consent(session, scope=ConsentScope.PARCEL, tracking_no=other.tracking_no, station_id=here.id)
    phone = parcel.recipient_phone
    assert phone is not None
    at_this_station = _standing(session, phone, "1, CENTURY  ave.", here.id)  # same address
    everywhere = _standing(session, phone, "1 Century Ave", None)
    _standing(session, phone, "1 Century Ave", there.id)  # another station's
    _standing(session, phone, "2 Century Ave", here.id)  # another address
    _standing(session, "+8613900000000", "1 Century Ave", here.id)  # another recipient
    found = consents_for(session, [parcel, no_phone])
    assert [fact.id for fact in found[parcel.tracking_no]] == sorted(
        [own, at_this_station, everywhere]
    )
    assert found.get(no_phone.tracking_no, []) == []
    assert other.tracking_no not in found


def test_each_refusal_withdraws_the_consents_given_before_it_from_then_on() -> None:
    """Refused at 10:00, a consent at 11:00 (the recipient changed their mind), refused
    again at 12:00: the 09:00 consent ends at 10:00, the 11:00 one at 12:00, and one
    revoked at 09:30 keeps its own end; one given at 13:00 stands."""
    day = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)

    def at(hour: float) -> dt.datetime:
        return day + dt.timedelta(hours=hour)

    def consent(id: int, granted: float, revoked: float | None = None) -> ConsentFact:
        return ConsentFact(
            id=id,
            method=ConsentMethod.ANY,
            point_id=None,
            granted_at=at(granted),
            revoked_at=None if revoked is None else at(revoked),
        )

    facts = [consent(1, 9), consent(2, 11), consent(3, 8, revoked=9.5), consent(4, 13)]
    withdrawn = withdrawn_by_refusals(facts, [at(12).isoformat(), at(10).isoformat()])
    assert [(f.id, f.revoked_at, f.refused_at) for f in withdrawn] == [
        (1, at(10), at(10)),
        (2, at(12), at(12)),
        (3, at(9.5), None),
        (4, None, None),
    ]


def test_an_address_key_ignores_spaces_beside_chinese_but_not_between_latin_words() -> None:
    unspaced = address_key("北京市朝阳区建国路1号院3号楼")
    for written in ("北京市 朝阳区 建国路 1 号院 3 号楼", "北京市朝阳区 建国路１号院３号楼。"):
        assert address_key(written) == unspaced
    assert address_key("世纪大道100号 A座") == address_key("世纪大道100号A座")
    assert address_key("1 Century Ave") != address_key("1 CenturyAve")
