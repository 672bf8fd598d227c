"""The station pages in headless Chromium: what a manager and an auditor do at 19:00."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Route, expect
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from courier_api.api.proofs.routes import CSV_COLUMNS
from models import AuditEntry
from models.engine import make_engine
from tests import factories
from tests.browser.conftest import Site, Ui
from tests.exports import exported

SHIFT_LINK = re.compile(r"^Shift \d+$")  # a board row's link to its shift's page

pytestmark = pytest.mark.browser


def board_path(site: Site) -> str:
    return f"/web/board?date={site.day.day}"


def test_the_board_shows_every_shift_with_its_balance(ui: Ui, site: Site) -> None:
    ui.login("manager")
    page = ui.page
    expect(page).to_have_url(re.compile(r"/web/board$"))  # today's board: nobody out yet
    expect(page.locator(".empty")).to_contain_text("No shift opened")
    page.get_by_label("Date").fill(str(site.day.day))  # the date picker: a plain GET form
    page.get_by_role("button", name="Show").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(
        f"PDG Pudong Gaoqiao · {site.day.day}"
    )
    rows = page.locator("table.board tbody tr")
    expect(rows).to_have_count(4)
    statuses = {
        "Li Wei": "balanced",
        "Zhang Min": "unbalanced",
        "Wang Qiang": "provisional",
        "Chen Lu": "open",  # still on the road
    }
    for courier, status in statuses.items():
        row = rows.filter(has_text=courier)
        expect(row).to_have_class(re.compile(rf"\brow-{status}\b"))
    for courier, status in list(statuses.items())[:3]:
        expect(rows.filter(has_text=courier).locator(".badge")).to_have_text(
            re.compile(rf"\b{status}$")
        )
    chen = rows.filter(has_text="Chen Lu")
    expect(chen.locator(".badge")).to_have_text("on the road")
    expect(chen.locator("td").nth(11)).to_have_text("2 out")  # not missing: not back yet
    missing_seqs = rows.filter(has_text="Wang Qiang").locator("td").nth(12)
    expect(missing_seqs).to_have_text("14")  # how many, then which: seq 4
    expect(missing_seqs.locator(".seqs")).to_have_text("4")
    discrepancies = rows.filter(has_text="Zhang Min").locator("td").nth(13)
    expect(discrepancies).to_have_text(re.compile(r"^2\s*2 open$"))  # how many, then undecided
    expect(discrepancies.locator(".discrepancies-open")).to_have_text("2 open")
    expect(rows.filter(has_text="Chen Lu").locator("td").nth(2)).to_contain_text("open")
    expect(page.locator(".summary")).to_contain_text(
        "1 on the road (2 parcels still out); handed over: 1 balanced, 1 unbalanced, 1 provisional"
    )
    expect(page.locator("tfoot")).to_contain_text("Day's totals")
    # Every column, discrepancies last, shows without scrolling sideways at 1280 pixels.
    widths = page.locator(".scroll").evaluate("el => [el.scrollWidth, el.clientWidth]")
    assert widths[0] <= widths[1], widths
    ui.assert_no_console_errors()


def test_a_manager_drills_into_the_unbalanced_shift(ui: Ui, site: Site) -> None:
    ui.login("manager", then=board_path(site))
    page = ui.page
    page.locator("table.board tbody tr", has_text="Zhang Min").get_by_role(
        "link", name=SHIFT_LINK
    ).click()
    expect(page).to_have_url(re.compile(rf"/web/shifts/{site.day.unbalanced.id}$"))
    expect(page.get_by_role("heading", level=1)).to_contain_text("unbalanced")
    drop = page.locator("article.discrepancy", has_text="unauthorized locker drop")
    expect(drop).to_contain_text(site.day.dropped_parcel)
    expect(drop).to_contain_text("No consent before this drop")
    expect(drop).to_contain_text("No consent on record for this parcel")
    expect(drop).to_contain_text("HIVE-PDG-03")
    expect(drop).to_contain_text("+4m00s")  # the PDA's clock ran four minutes fast
    expect(drop.locator("a", has_text=re.compile(r"^#\d+$"))).to_have_count(1)
    expect(drop.locator("img.thumb")).to_have_count(1)
    assert ui.images_loaded("article.discrepancy img.thumb") == 1
    missing = page.locator("article.discrepancy", has_text="missing at handover")
    expect(missing).to_contain_text(site.day.missing_parcel)
    expect(missing).to_contain_text("out for delivery")
    expect(page.locator("details.outcome-missing")).to_contain_text(site.day.missing_parcel)
    expect(page.locator("form.signoff")).to_be_visible()
    ui.assert_no_console_errors()


def test_a_manager_filters_the_queue_by_a_kind_written_as_the_queue_writes_it(
    ui: Ui, site: Site
) -> None:
    ui.login("manager", then="/web/flags")
    page = ui.page
    page.get_by_label("Kind").select_option(label="unauthorized locker drop")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"[?&]kind=unauthorized_locker_drop(&|$)"))
    rows = page.locator("table.flags tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("unauthorized locker drop")
    expect(page.get_by_label("Kind")).to_have_value("unauthorized_locker_drop")
    ui.assert_no_console_errors()


def test_a_manager_resolves_a_flag_from_the_queue(ui: Ui, site: Site) -> None:
    ui.login("manager", then="/web/flags?kind=unauthorized_locker_drop")
    page = ui.page
    row = page.locator("table.flags tbody tr", has_text="unauthorized locker drop")
    expect(row).to_have_count(1)
    expect(row.locator(".badge")).to_have_text(re.compile("open|acknowledged"))
    row.get_by_placeholder("How it was resolved").fill("courier called the recipient: agreed")
    row.get_by_role("button", name="Resolve").click()
    expect(page.locator(".flash-ok")).to_contain_text("is resolved")
    # Back on the same filtered queue (POST-redirect-GET), the flag resolved.
    expect(page).to_have_url(re.compile(r"/web/flags\?kind=unauthorized_locker_drop$"))
    expect(row.locator(".badge")).to_have_text("resolved")
    expect(row.get_by_role("button", name="Resolve")).to_have_count(0)
    row.get_by_role("link", name=re.compile(r"^#\d+$")).click()
    expect(page.locator("ol.history")).to_contain_text("courier called the recipient: agreed")
    ui.assert_no_console_errors()


def test_a_manager_signs_shifts_off_and_a_provisional_one_needs_a_reason(
    ui: Ui, site: Site
) -> None:
    ui.login("manager", then=f"/web/shifts/{site.day.balanced.id}")
    page = ui.page
    page.get_by_label("Note").fill("all parcels checked against the manifest")
    page.get_by_role("button", name="Sign off the handover").click()
    expect(page.locator(".flash-ok")).to_contain_text("is signed off")
    expect(page.locator("dl.facts")).to_contain_text("all parcels checked against the manifest")
    expect(page.locator("form.signoff")).to_have_count(0)

    ui.go(f"/web/shifts/{site.day.provisional.id}")
    expect(page.locator("#missing-seqs")).to_contain_text("4")
    page.get_by_label("Note", exact=True).fill("checked what arrived")
    page.get_by_role("button", name="Sign off the handover").click()
    expect(page.locator(".flash-error")).to_contain_text("provisional")
    expect(page.locator("form.signoff")).to_be_visible()
    expect(page.get_by_label("Note", exact=True)).to_have_value("checked what arrived")  # kept
    page.get_by_label("Reason to sign off now").fill("PDA broken; the vendor has it")
    page.get_by_role("button", name="Sign off the handover").click()
    expect(page.locator(".flash-ok")).to_contain_text("is signed off")
    expect(page.locator("dl.facts")).to_contain_text("forced: PDA broken; the vendor has it")
    ui.assert_no_console_errors()


def test_an_auditor_searches_proofs_and_sees_the_consent_of_each_drop(ui: Ui, site: Site) -> None:
    day = site.day.day
    ui.login(
        "auditor",
        then=f"/web/proofs?method=locker&station={site.day.station.id}"
        f"&occurred_from={day}&occurred_to={day}",
    )
    page = ui.page
    rows = page.locator("table.proofs tbody tr")
    expect(rows).to_have_count(2)
    authorized = page.locator(f"#proof-{site.day.authorized_drop_event_id}")
    expect(authorized.locator(".consent-cell")).to_contain_text("Authorized by consent #")
    expect(authorized.locator(".consent-cell")).to_contain_text("in person")
    dropped = page.locator(f"#proof-{site.day.drop_event_id}")
    expect(dropped.locator(".consent-cell")).to_have_text("No consent before this drop")
    expect(dropped).to_contain_text("+8613812345678")  # auditors see phone numbers
    expect(page.locator("form[action*='resolve'], form.signoff")).to_have_count(0)

    page.get_by_label("Method").select_option("in_person")
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(r"method=in_person"))
    placeholder = page.locator(".thumb-missing", has_text="not uploaded yet")
    expect(placeholder).to_have_count(1)
    # No image is loaded (nor hashed) by a search: each links to its proof's page.
    expect(page.locator("table.proofs img")).to_have_count(0)
    assert page.locator("table.proofs a[href$='#images']").count() >= 4
    ui.assert_no_console_errors()


def test_an_auditor_exports_the_current_filter_as_csv(ui: Ui, site: Site) -> None:
    day = site.day.day
    ui.login(
        "auditor",
        then=f"/web/proofs?station={site.day.station.id}&method=in_person"
        f"&occurred_from={day}&occurred_to={day}",
    )
    page = ui.page
    shown = page.locator("table.proofs tbody tr td:nth-child(2)").all_inner_texts()
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    path = download.value.path()
    assert download.value.suggested_filename == "proofs.csv"
    rows = exported(Path(path).read_text())  # its last line saying it is complete
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 7  # the day's deliveries in person at PDG, not the week's
    assert [r["tracking_no"] for r in rows] == [s.split("\n")[0] for s in shown]
    assert {r["method"] for r in rows} == {"in_person"}
    assert {r["station_id"] for r in rows} == {str(site.day.station.id)}
    ui.assert_no_console_errors()


def test_the_daily_report_draws_its_charts(ui: Ui, site: Site) -> None:
    ui.login("manager", then=f"/web/reports/daily?date={site.day.day}")
    page = ui.page
    couriers = page.locator("#chart-couriers svg")
    expect(couriers).to_have_attribute("role", "img")
    expect(couriers.locator("rect")).to_have_count(4 * 5)  # four couriers, five series
    expect(couriers.locator("rect").first).to_be_visible()
    week = page.locator("#chart-week svg")
    expect(week.locator("title").first).to_have_text("The last 7 days")
    expect(week.locator("rect").first).to_be_visible()
    expect(page.locator("table.report").first).to_contain_text("Zhang Min")
    expect(page.locator("dl.metrics")).to_contain_text("Checked out")
    ui.assert_no_console_errors()


def test_the_pages_read_without_javascript(open_ui: Callable[..., Ui], site: Site) -> None:
    ui = open_ui(java_script_enabled=False)
    ui.login("manager", then=board_path(site))
    page = ui.page
    expect(page.locator("table.board tbody tr")).to_have_count(4)
    page.locator("table.board tbody tr", has_text="Wang Qiang").get_by_role(
        "link", name=SHIFT_LINK
    ).click()
    expect(page.locator("#missing-seqs")).to_contain_text("4")
    expect(page.locator("details.outcome-missing")).to_have_attribute("open", "")
    ui.go(f"/web/shifts/{site.day.unbalanced.id}")
    expect(page.locator("article.discrepancy")).to_have_count(2)
    ui.assert_no_console_errors()


def proof_reads(site: Site, event_id: int) -> int:
    engine = make_engine(site.database_url)
    try:
        with Session(engine) as session:
            return session.scalar(
                select(func.count())
                .select_from(AuditEntry)
                .where(AuditEntry.action == "proof_read", AuditEntry.subject_key == str(event_id))
            )
    finally:
        engine.dispose()


def test_a_link_on_another_site_reads_no_proof_in_the_auditors_name(ui: Ui, site: Site) -> None:
    """A page elsewhere (a mail, a forum) linking to a proof's page: the auditor signed in
    who follows it must not put a read of that proof on record unknowingly. The session
    cookie is SameSite=Strict: the navigation from the other site comes without it (Lax
    sent it with every top-level navigation, and the read was recorded), so the link
    lands on the sign-in page, and signing in opens the proof."""
    event_id = site.day.drop_event_id
    proof = f"{site.base_url}/web/proofs/{event_id}"
    ui.login("auditor")
    before = proof_reads(site, event_id)

    def elsewhere(route: Route) -> None:
        route.fulfill(content_type="text/html", body=f'<a id="bait" href="{proof}">news</a>')

    page = ui.page
    page.route("http://elsewhere.example/**", elsewhere)
    page.goto("http://elsewhere.example/")
    page.locator("#bait").click()
    page.wait_for_load_state()
    expect(page).to_have_url(re.compile(r"/web/login\?next="))
    assert proof_reads(site, event_id) == before

    ui.go(f"/web/proofs/{event_id}")  # the auditor's own navigation: the session comes
    expect(page).to_have_url(re.compile(rf"/web/proofs/{event_id}$"))
    assert proof_reads(site, event_id) == before + 1
    ui.assert_no_console_errors()


def test_signing_in_where_a_link_from_elsewhere_landed_keeps_the_other_tabs_forms(
    ui: Ui, site: Site
) -> None:
    """A manager with the board open follows a link in a mail in another tab: Chromium
    withholds the SameSite=Strict session, the link lands on the sign-in page, and the
    manager signs in there. The board's forms, written before, still go through: that
    sign-in gave the session a new CSRF secret, and the board's next form (a sign-off, a
    sign-out) was refused with a 400 page."""
    ui.login("manager")
    ui.go(board_path(site))
    board = ui.page
    mail = board.context.new_page()
    target = f"{site.base_url}{board_path(site)}"

    def elsewhere(route: Route) -> None:
        route.fulfill(content_type="text/html", body=f'<a id="link" href="{target}">board</a>')

    mail.route("http://elsewhere.example/**", elsewhere)
    mail.goto("http://elsewhere.example/")
    mail.locator("#link").click()
    mail.wait_for_load_state()
    expect(mail).to_have_url(re.compile(r"/web/login\?next="))
    mail.get_by_label("Username").fill("manager")
    mail.get_by_label("Password").fill(factories.PASSWORD)
    mail.get_by_role("button", name="Sign in").click()
    mail.wait_for_load_state()
    expect(mail).to_have_url(target)

    board.get_by_role("button", name="Sign out").click()  # the form written before
    board.wait_for_load_state()
    expect(board).to_have_url(re.compile(r"/web/login$"))
    expect(board.locator(".flash")).to_contain_text("You are signed out.")
    ui.assert_no_console_errors()
