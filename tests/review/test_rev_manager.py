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

from models import Flag
from sync.handover import MISSING
from tests.conftest import Auth, World
from tests.courier_api.test_shifts_api import Courier, parcels
from tests.courier_api.test_web_pages import signed_in


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
