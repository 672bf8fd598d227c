"""Second reader, point of view: an attacker (stolen PDA, rogue courier, curious manager
of another station, tampering with auditors' data) and a new user following README.

Each test fails now and passes once its defect is fixed."""

from __future__ import annotations

import datetime as dt

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from models import Parcel
from tests import factories
from tests.browser import station_day
from tests.browser.station_day import StationDay
from tests.conftest import Auth, World
from tests.courier_api.test_web_pages import signed_in

CONSENTS = "/api/v1/consents"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


@pytest.fixture
def parcel(session: Session, world: World) -> Parcel:
    parcel = factories.parcel(session, world.station)  # express, +8613812345678
    session.commit()
    return parcel


# -- 1. a full phone number written with its country code but without "+" ----------------


@pytest.mark.parametrize(
    "typed",
    [
        "SMS reply Y from 8613812345678",  # an SMS gateway's MSISDN: no "+"
        "SMS reply Y from 008613812345678",  # dialled from China: 00 86 ...
        "recipient called from 86-138-1234-5678",
    ],
)
def test_a_phone_typed_with_its_country_code_but_no_plus_is_masked_for_a_manager(
    client: FlaskClient, auth: Auth, world: World, parcel: Parcel, typed: str
) -> None:
    """The SMS gateway writes the recipient's number into the consent's evidence as
    gateways write MSISDNs, country code first and no "+". SECURITY.md threat 3: phone
    numbers typed into free text (a consent's evidence) are masked for everyone but
    auditors. The manager (and an admin reading the audit log) reads it whole."""
    body = {
        "scope": "parcel",
        "tracking_no": parcel.tracking_no,
        "method": "locker",
        "channel": "sms",
        "granted_at": (_now() - dt.timedelta(hours=1)).isoformat(),
        "evidence": typed,
    }
    granted = client.post(CONSENTS, json=body, headers=auth.headers("app1"))
    assert granted.status_code == 201, granted.get_json()
    consent_id = granted.get_json()["id"]

    as_manager = client.get(f"{CONSENTS}/{consent_id}", headers=auth.headers("manager1"))
    assert as_manager.status_code == 200
    assert "1381234" not in _digits(as_manager.get_json()["evidence"])

    entries = client.get(
        "/api/v1/audit",
        query_string={"action": "consent_granted"},
        headers=auth.headers("admin"),
    ).get_json()["items"]
    assert entries and "1381234" not in _digits(entries[0]["details"]["evidence"])

    as_auditor = client.get(f"{CONSENTS}/{consent_id}", headers=auth.headers("auditor1"))
    assert as_auditor.get_json()["evidence"] == typed


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
