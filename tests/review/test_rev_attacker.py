"""Second reader, point of view: an attacker (stolen PDA, rogue courier, curious manager
of another station, tampering with auditors' data) and a new user following README.

Each test fails now and passes once its defect is fixed."""

from __future__ import annotations

import pytest
from flask import Flask
from sqlalchemy.orm import Session

from tests.browser import station_day
from tests.browser.station_day import StationDay
from tests.courier_api.test_web_pages import signed_in

# -- 2. proof images on the pages stay in the browser's cache for a year -----------------------


@pytest.fixture
def day(session: Session, app: Flask) -> StationDay:
    return station_day.build(session, app.config["BLOB_DIR"], history_days=0)


def test_a_proof_image_shown_on_the_pages_is_not_kept_by_the_browser(
    app: Flask, day: StationDay
) -> None:
    """A station's shared computer: the manager reads a proof (the recipient's signature
    and doorstep photo) and signs out; the next person at the desk opens the browser's
    cache. README (Pages): pages are sent with `Cache-Control: no-store`, and the
    views say why: "Pages hold recipients' data: not kept by the browser after signing
    out". The proof page is; the recipient's images it shows are cached for a year
    (`private, max-age=31536000, immutable`)."""
    manager = signed_in(app, "manager")
    image = manager.client.get(f"/web/images/{day.uploaded[0]}")
    assert image.status_code == 200
    assert "no-store" in image.headers["Cache-Control"]
