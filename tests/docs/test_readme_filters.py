"""The filters README.md names for a list are query arguments the endpoint takes: a
PDA developer or an auditor's script sending one the README named and the endpoint
does not know gets a 422 ``Unknown field`` (it named ``device`` for ``device_id``)."""

import re
from pathlib import Path

from flask import Flask

from courier_api.extensions import api

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `GET (/api/v1/[^`?]*)`(.*)$", re.M)


def filters_clause(row: str) -> str | None:
    """What follows ``filters:`` up to the parenthesis that closes it."""
    start = row.find("filters: ")
    if start < 0:
        return None
    depth = 0
    for end in range(start, len(row)):
        if row[end] == "(":
            depth += 1
        elif row[end] == ")":
            if depth == 0:
                return row[start + len("filters: ") : end]
            depth -= 1
    return row[start + len("filters: ") :]


def named_filters(clause: str) -> list[str]:
    """Each item's names: those in backticks, else the item as one bare word (an item
    of several bare words names no argument and is kept whole, to fail)."""
    flat = clause
    while re.search(r"\([^()]*\)", flat):
        flat = re.sub(r"\s*\([^()]*\)", "", flat)
    names = []
    for item in (part.strip() for part in flat.split(",")):
        quoted = re.findall(r"`(\w+)`", item)
        names.extend(quoted or [item])
    return names


def documented_lists() -> dict[str, list[str]]:
    rows = {}
    for path, rest in ROW.findall(README.read_text(encoding="utf-8")):
        clause = filters_clause(rest)
        if clause is not None:
            rows[path] = named_filters(clause)
    return rows


def test_the_readme_names_filters_of_lists() -> None:
    """The pattern still finds what it is for (else the test below checks nothing)."""
    assert {"/api/v1/shifts", "/api/v1/flags", "/api/v1/audit"} <= set(documented_lists())


def test_every_filter_the_readme_names_is_a_query_argument(app: Flask) -> None:
    with app.app_context():
        spec = api.spec.to_dict()
    unknown = {}
    for path, names in documented_lists().items():
        taken = {p["name"] for p in spec["paths"][path]["get"].get("parameters", [])}
        if missing := [name for name in names if name not in taken]:
            unknown[path] = missing
    assert unknown == {}


def test_every_list_pages_as_the_readme_says(app: Flask) -> None:
    """README's "Lists page by keyset" gives one default and one largest ``limit``:
    every endpoint taking a ``limit`` takes it so, but a parcel's timeline, whose own
    default the same sentence gives."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    sentence = text[text.index("Lists page by keyset") :].split(". ")[0]
    default, most = map(int, re.search(r"default (\d+), at most (\d+)", sentence).groups())  # type: ignore[union-attr]
    timeline_default = int(re.search(r"a parcel's timeline \(default (\d+)", sentence).group(1))  # type: ignore[union-attr]
    with app.app_context():
        spec = api.spec.to_dict()
    limits = {
        f"{method.upper()} {path}": (schema.get("default"), schema.get("maximum"))
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if method in ("get", "post", "put", "patch", "delete")
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "limit"
        for schema in [parameter["schema"]]
    }
    assert len(limits) > 10
    assert limits.pop("GET /api/v1/parcels/{tracking_no}") == (timeline_default, most)
    assert {key: value for key, value in limits.items() if value != (default, most)} == {}
