"""Second reader, a station manager at 19:00: the board, the shift and flag pages, and
the sign-off of many shifts together. Each test fails on main and passes once its
defect is fixed."""

from __future__ import annotations

import datetime as dt
import re

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Flag, Shift
from sync.handover import MISSING
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, parcels
from tests.courier_api.test_web_pages import signed_in


def _provisional_shift(client: FlaskClient, session: Session, world: World, pda: Courier) -> int:
    [a] = parcels(session, world, 1)
    shift_id = pda.open(first_seq=1)["id"]
    first = pda.event(a)
    pda.event(a, "delivered")  # seq 2, still on the PDA
    last = pda.event(a, "returned_to_station")
    pda.push([first, last])
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200
    return shift_id


def test_a_refused_sign_off_keeps_the_note_the_manager_typed(
    app: Flask, client: FlaskClient, session: Session, auth: Auth, world: World
) -> None:
    """The manager writes a long note on a provisional shift and forgets the reason: the
    page says "Not signed off: the balance is provisional ..." and comes back with an
    empty note. The same when a push changed the balance meanwhile. The form must keep
    what was typed."""
    pda = Courier(client, auth, "courier1", "PDA-0001")
    shift_id = _provisional_shift(client, session, world, pda)
    pages = signed_in(app, "manager1")
    path = f"/web/shifts/{shift_id}"
    [shown] = re.findall(r'name="balance_version" value="([0-9a-f]{16})"', pages.get(path))
    note = "Called the recipient about the parcel: left with the neighbour, seq 2 on the PDA"
    pages.post(f"{path}/signoff", note=note, balance_version=shown)
    page = pages.get(path)
    assert "Not signed off" in page
    assert note in page, "the note typed is lost"
    session.expire_all()
    assert session.get(Shift, shift_id).status.value == "closed"

    # A balance that changed between the read and the sign-off: refused, note kept too.
    reason = "PDA broken, screen shows seq 2 was the delivery"
    pages.post(f"{path}/signoff", note=note, force_reason=reason, balance_version="0" * 16)
    page = pages.get(path)
    assert "Not signed off: the balance of shift" in page
    assert note in page and reason in page, "the note and reason typed are lost"


def test_a_refused_flag_resolution_keeps_the_note_the_manager_typed(
    app: Flask, client: FlaskClient, session: Session, auth: Auth, world: World
) -> None:
    """A push changes a flag's evidence while the manager writes how it was resolved:
    the page says "Not resolved: the evidence ... changed" and the typed note is gone."""
    pda = Courier(client, auth, "courier1", "PDA-0001")
    [a] = parcels(session, world, 1)
    shift_id = pda.open(first_seq=1)["id"]
    pda.push([pda.event(a)])
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200
    flag = session.scalar(select(Flag).where(Flag.kind == MISSING, Flag.shift_id == shift_id))
    assert flag is not None
    pages = signed_in(app, "manager1")
    path = f"/web/flags/{flag.id}"
    note = "Found on the shelf behind the counter, recipient collects tomorrow"
    pages.post(f"{path}/resolve", note=note, evidence_version="0" * 16, next=path)
    page = pages.get(path)
    assert "Not resolved" in page
    assert note in page, "the note typed is lost"


def _footer_numbers(page: str) -> list[int]:
    footer = re.search(r"<tfoot>(.*?)</tfoot>", page, re.S)
    assert footer is not None, page
    cells = re.findall(r'<td class="num">(.*?)</td>', footer.group(1), re.S)
    return [sum(int(n) for n in re.findall(r"\d+", cell)) for cell in cells]


def test_the_board_footer_adds_up_while_a_shift_is_on_the_road(
    app: Flask, client: FlaskClient, session: Session, auth: Auth, world: World
) -> None:
    """19:00, one courier still out with one of two parcels: the footer reads checked
    out 2, returned 1, missing 0, and nothing else. The row says "1 out", the summary
    "1 parcel still out", but the day's totals row does not add up: checked out =
    delivered + no POD + unattended + no consent + returned + missing (or out)."""
    pda = Courier(client, auth, "courier1", "PDA-0001")
    a, b = parcels(session, world, 2)
    pda.open(first_seq=1)
    pda.push([pda.event(a), pda.event(b), pda.event(a, "returned_to_station")])
    page = signed_in(app, "manager1").get(f"/web/board?station={world.station.id}")
    (
        checked_out,
        delivered,
        no_pod,
        unattended,
        no_consent,
        returned,
        _not_checked_out,
        missing_or_out,
        *_,
    ) = _footer_numbers(page)
    assert checked_out == (
        delivered + no_pod + unattended + no_consent + returned + missing_or_out
    ), _footer_numbers(page)


def test_the_flag_queue_shows_when_a_flag_it_lists_first_was_opened_again(
    app: Flask, client: FlaskClient, session: Session, auth: Auth, world: World
) -> None:
    """The queue lists the latest opened first, but shows only when each flag was first
    raised: a flag reopened this evening sits at the top dated days ago, above today's,
    with nothing saying why. The row must show when it was opened again."""
    pda = Courier(client, auth, "courier1", "PDA-0001")
    [a] = parcels(session, world, 1)
    shift_id = pda.open(first_seq=1)["id"]
    pda.push([pda.event(a)])
    assert pda.close(shift_id, last_seq=pda.seq).status_code == 200
    flag = session.scalar(select(Flag).where(Flag.kind == MISSING, Flag.shift_id == shift_id))
    assert flag is not None
    # Raised three days ago; opened again an hour ago (a late batch, say).
    three_days_ago = flag.raised_at - dt.timedelta(days=3)
    reopened = flag.raised_at - dt.timedelta(hours=1)
    flag.raised_at = three_days_ago
    flag.opened_at = reopened
    session.commit()
    page = signed_in(app, "manager1").get("/web/flags")
    row = re.search(rf'<tr id="flag-{flag.id}"[^>]*>(.*?)</tr>', page, re.S)
    assert row is not None, page
    local = reopened.astimezone(dt.timezone(dt.timedelta(hours=8)))  # Asia/Shanghai
    assert local.strftime("%Y-%m-%d %H:%M") in row.group(1), row.group(1)
