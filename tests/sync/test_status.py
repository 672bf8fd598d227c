"""Pure parts of the parcel projection's bookkeeping (``sync.status``)."""

from __future__ import annotations

from sync.status import ParcelChange


def test_a_closed_flags_reason_names_who_changed_the_parcel_only_where_they_may_be_known() -> None:
    """A parcel's change closes its rule flags at every station: the reason names a
    station's user at that station only (SECURITY.md threat 3); an admin, an
    integration and the command line work across stations and are named everywhere,
    as the pages name them (``sync.pages.sees_user``)."""
    what = "class from express to parcel"
    manager = ParcelChange("manager1", 1, what)
    assert manager.reason(1) == "manager1 changed the parcel's class from express to parcel"
    assert manager.reason(2) == (
        "a user of another station changed the parcel's class from express to parcel"
    )
    for station in (1, 2):
        assert ParcelChange("admin", None, what).reason(station).startswith("admin changed")
