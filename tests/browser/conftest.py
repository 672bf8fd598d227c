"""Browser tests: the real app served from a thread, driven by headless Chromium.

Playwright's Python package drives the system's Chromium (Debian's ``chromium``,
``/usr/bin/chromium``, or ``CHROMIUM``); no browser is ever downloaded. Without
one the tests are skipped with a plain message, except under ``CI=true``, where
they fail. They run in the SQLite pass of ``make test`` only: they bring their
own server and database (a SQLite file under the run's tmp dir, migrated and
filled with ``station_day``), so a PostgreSQL pass would test nothing new.

Every test gets a fresh browser context; the console's errors and the page's
uncaught exceptions are recorded (each test asserts there were none), and a
screenshot of the final state is saved to ``test-output/screenshots/<test>.png``
whether the test passed or not.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from sqlalchemy.orm import Session
from werkzeug.serving import make_server

from courier_api.extensions import db
from models import migrate
from models.engine import make_engine
from tests import factories
from tests.browser import station_day
from tests.conftest import OUTPUT_DIR, make_test_app

CHROMIUM = Path(os.environ.get("CHROMIUM") or "/usr/bin/chromium")
SCREENSHOTS = OUTPUT_DIR / "screenshots"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 860}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def chromium() -> str:
    if os.environ.get("TEST_DATABASE_URL", "").startswith("postgresql"):
        pytest.skip("browser tests run in the SQLite pass (they bring their own database)")
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        message = f"no Chromium at {CHROMIUM}"
        if in_ci():
            pytest.fail(
                f"{message}: CI runs the browser tests (apt-get install chromium, or set "
                "CHROMIUM to a Chromium executable)",
                pytrace=False,
            )
        pytest.skip(f"browser tests skipped: {message} (apt-get install chromium)")
    return str(CHROMIUM)


@dataclass
class Site:
    base_url: str
    day: station_day.StationDay
    database_url: str


@pytest.fixture(scope="session")
def site(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The app on 127.0.0.1 (a free port), over a migrated SQLite file holding the day."""
    root = tmp_path_factory.mktemp("pages")
    url = f"sqlite:///{root / 'pages.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    with Session(engine, expire_on_commit=False) as session:
        day = station_day.build(session, root / "blobs")
    engine.dispose()
    app = make_test_app(url, root)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="pages-server", daemon=True)
    thread.start()
    try:
        yield Site(base_url=f"http://127.0.0.1:{server.server_port}", day=day, database_url=url)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        db.engine_of(app).dispose()


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Ui:
    """One browser tab on the site, with what its console said."""

    page: Page
    site: Site
    errors: list[str] = field(default_factory=list)

    def go(self, path: str) -> None:
        response = self.page.goto(self.site.base_url + path)
        assert response is not None

    def login(self, username: str, *, then: str | None = None) -> None:
        """Sign in through the form (coming back to ``then`` when given)."""
        self.go(then or "/web/login")
        if "/web/login" not in self.page.url:
            raise AssertionError(f"expected the login page, got {self.page.url}")
        self.page.get_by_label("Username").fill(username)
        self.page.get_by_label("Password").fill(factories.PASSWORD)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_load_state()
        assert "/web/login" not in self.page.url, self.page.content()

    def images_loaded(self, selector: str) -> int:
        """Wait until every image matching ``selector`` has loaded and decoded (a broken
        one never does); how many there are."""
        self.page.wait_for_function(
            "s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
            arg=selector,
        )
        return self.page.locator(selector).count()

    def assert_no_console_errors(self) -> None:
        assert self.errors == [], "the browser reported errors:\n" + "\n".join(self.errors)


@pytest.fixture
def open_ui(
    browser: Browser, site: Site, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Ui]]:
    """Open a tab (``java_script_enabled=False`` for a tab without scripts); each is
    screenshotted at the end of the test and checked for console errors."""
    opened: list[tuple[BrowserContext, Ui]] = []

    def open_tab(*, java_script_enabled: bool = True) -> Ui:
        context = browser.new_context(
            viewport=VIEWPORT, java_script_enabled=java_script_enabled, accept_downloads=True
        )
        page = context.new_page()
        ui = Ui(page=page, site=site)
        page.on(
            "console",
            lambda message: (
                ui.errors.append(f"console {message.type}: {message.text}")
                if message.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda error: ui.errors.append(f"page error: {error}"))
        opened.append((context, ui))
        return ui

    yield open_tab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    for n, (context, ui) in enumerate(opened):
        suffix = "" if n == 0 else f"-{n + 1}"
        ui.page.screenshot(path=str(SCREENSHOTS / f"{name}{suffix}.png"), full_page=True)
        context.close()


@pytest.fixture
def ui(open_ui: Callable[..., Ui]) -> Ui:
    return open_ui()
