"""Second reader (courier's point of view): a PDA offline all afternoon that uploads
its backlog in several pushes, retried and out of order, on a clock that jumped."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests import factories
from tests.conftest import Auth, World

PUSH = "/api/v1/sync/push"
SHIFTS = "/api/v1/shifts"
FLAGS = "/api/v1/flags"
FACTORY_DATE = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _push(client: FlaskClient, headers: dict[str, str], events: list[Any]) -> dict[str, Any]:
    response = client.post(PUSH, json=factories.push_body("PDA-0001", events), headers=headers)
    assert response.status_code == 200, response.get_json()
    receipt: dict[str, Any] = response.get_json()
    return receipt


def _clock_jump(client: FlaskClient, manager: dict[str, str]) -> dict[str, Any]:
    listed = client.get(FLAGS, query_string={"kind": "clock_jump"}, headers=manager).get_json()
    (flag,) = listed["items"]
    return client.get(f"{FLAGS}/{flag['id']}", headers=manager).get_json()


# -- 1. a clock_jump at its evidence cap ---------------------------------------------------


def test_a_clock_jump_at_its_cited_limit_refuses_a_decision_read_before_the_next_jump(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """The PDA's battery died at noon and it came back dated 2000-01-01: the courier's
    afternoon, 205 scans, is pushed at 18:00 on that clock and the PDA's clock_jump flag
    cites 200 of them (MAX_EVIDENCE_IDS). The manager opens the flag. Meanwhile the PDA,
    its clock still wrong, pushes one more delivery stamped 2000: the flag's cause
    recurs on it, yet its evidence does not change (the cap is reached), so neither does
    its ``evidence_version``. The manager presses Resolve with the version they read:
    README says such a decision is refused (409 ``evidence_changed``) when a push
    landed between the read and the decision; here it is accepted, and it settles a
    delivery on a jumped clock that the manager was never shown (and that the flag
    does not even name)."""
    first, second = (factories.parcel(session, world.station).tracking_no for _ in range(2))
    session.commit()
    courier = auth.headers("courier1", "PDA-0001")
    manager = auth.headers("manager1")
    afternoon = [
        factories.event(
            seq, first, "out_for_delivery", occurred_at=FACTORY_DATE + dt.timedelta(minutes=seq)
        )
        for seq in range(1, 206)
    ]
    _push(client, courier, afternoon)
    read = _clock_jump(client, manager)
    assert read["status"] == "open"

    late = factories.event(
        206,
        second,
        "delivered",
        occurred_at=FACTORY_DATE + dt.timedelta(hours=5),
        pod={"recipient_name": "Wang", "signature_sha256": "c" * 64},
    )
    _push(client, courier, [late])

    decided = client.post(
        f"{FLAGS}/{read['id']}/resolve",
        json={"note": "clock reset, courier told", "evidence_version": read["evidence_version"]},
        headers=manager,
    )
    assert decided.status_code == 409, (
        "a resolution read before the push that jumped again was accepted",
        late["client_event_id"] in decided.get_json()["decided_on"]["client_event_ids"],
    )
    assert decided.get_json()["code"] == "evidence_changed"


# -- 2. a wrong_shift closed for a shift its events never named -----------------------------


def test_a_close_does_not_close_the_wrong_shift_of_events_that_named_another_shift(
    client: FlaskClient, auth: Auth, session: Session, world: World
) -> None:
    """courier1 forgets to close their shift and hands PDA-0001 to courier2. The PDA's
    app still stamps its queued events with a shift id left from another PDA's session
    (424242, no shift of this PDA): the push under courier2's sign-in raises the PDA's
    ``wrong_shift`` flag, and the events wait, filed under no shift. The manager closes
    courier1's shift declaring its last seq, which takes them by their seqs. The PDA
    still names a shift that is not its own, yet the flag is closed, its reason saying
    the shift "closed declaring the seqs its events name it by": the events never named
    it. ``_close_wrong_shift_if_taken`` is meant for the handover whose events named the
    closing shift (a claim the close makes good), and checks the seqs only, not which
    shift they named."""
    from tests.courier_api.test_shifts_api import Courier, parcels

    factories.user(session, "courier2", "courier", world.station)
    first, second = parcels(session, world, 2)
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift = pda.open(first_seq=1)
    pda.push([pda.event(first), pda.event(second)])
    afternoon = now() - dt.timedelta(hours=3)
    queued = [
        pda.event(first, "delivered", occurred_at=afternoon, shift_id=424242),
        pda.event(second, "returned_to_station", occurred_at=afternoon, shift_id=424242),
    ]
    pda.headers = auth.headers("courier2", "PDA-0001")
    pda.push(queued)
    manager = auth.headers("manager1")
    (named,) = client.get(FLAGS, query_string={"kind": "wrong_shift"}, headers=manager).get_json()[
        "items"
    ]
    assert named["status"] == "open" and named["evidence"]["claimed_shift_ids"] == [424242]

    closed = client.post(f"{SHIFTS}/{shift['id']}/close", json={"last_seq": 4}, headers=manager)
    assert closed.status_code == 200, closed.get_json()

    after = client.get(f"{FLAGS}/{named['id']}", headers=manager).get_json()
    assert after["status"] == "open", (after["status"], after.get("closed_reason"))
