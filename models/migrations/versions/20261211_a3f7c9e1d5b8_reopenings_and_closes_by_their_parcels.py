"""Reopenings, closes for the courier and decisions on shift or PDA flags, by their parcels

An auditor settling a dispute about a lost parcel lists ``GET /audit?tracking_no=``:
the version before filed a shift's reopening (``shift_reopened``), its withdrawal
(``shift_reopening_withdrawn``), a close by someone else than the courier
(``shift_closed_for_courier``), a last seq its PDA declared afterwards
(``shift_last_seq_declared``) and a manager's decision on a shift's or a PDA's flag
citing its events under no parcel, and the parcel's history missed them.
The service now files them as it appends them (``sync.shifts``); the entries written
before get theirs here, in ``audit_entry_parcel``, from what they record:

* a reopening, the parcels of the events and rejected events it named (its
  ``details.event_ids``, ``details.rejected_event_ids``);
* a withdrawal, those of the reopening it withdrew: the shift's latest
  ``shift_reopened`` entry before it (its details name no event);
* a close for the courier and a last seq declared, every parcel of the shift's
  events, as the service files them: the shift's events now, which is what they were
  then but for events filed under it since (a late push, a rejudge);
* a manager's acknowledgement or resolution of a flag of no one parcel (a shift's
  ``late_event_after_signoff``, a PDA's), the parcels of the events and rejected events
  it covered (``details.decided_on``).

No schema changes; outside the hash chain, as ``b1d7e3a9c5f2``'s rows. Each statement
reads only these entries (``ix_audit_entry_action``) and writes only rows not there
yet, so it runs again to the same end, and holds no lock an append waits for.

Revision ID: a3f7c9e1d5b8
Revises: b1d7e3a9c5f2
Create Date: 2026-12-11 09:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "a3f7c9e1d5b8"
down_revision: str | None = "b1d7e3a9c5f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "audit_entry_parcel"

# (tracking_no, id) of the parcels of the scan events, then of the rejected events, an
# entry cites: a reopening in its details, a decision on a flag of no one parcel in what
# it covered (``decided_on``).
CITING = (
    ("e.action = 'shift_reopened'", ()),  # a reopening: in its details
    (  # a decision on a flag of no one parcel: in what it covered
        "e.action IN ('flag_acknowledged', 'flag_resolved') AND e.tracking_no IS NULL",
        ("decided_on",),
    ),
)
CITED = (  # the key, the table of the ids listed under it, the parcel's column there
    ("event_ids", "scan_event", "s.tracking_no"),
    ("rejected_event_ids", "quarantined_event", "s.parcel_tracking_no"),
)
POSTGRESQL_CITED = """SELECT {parcel} AS tracking_no, e.id AS id FROM audit_entry e
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(e.details #> '{path}') = 'array'
        THEN e.details #> '{path}' ELSE '[]'::jsonb END) AS n(value)
    JOIN {table} s ON s.id = CASE WHEN jsonb_typeof(n.value) = 'number'
        THEN (n.value #>> '{{}}')::numeric::bigint END
    WHERE {where} AND {parcel} IS NOT NULL"""
SQLITE_CITED = """SELECT {parcel} AS tracking_no, e.id AS id FROM audit_entry e,
        json_each(e.details, '{path}') n
    JOIN {table} s ON s.id = n.value
    WHERE {where} AND json_type(e.details, '{path}') = 'array'
        AND n.type = 'integer' AND {parcel} IS NOT NULL"""


def _cited(dialect: str) -> list[str]:
    """The SELECTs of the parcels every citing entry cites, on ``dialect``."""
    selects = []
    for where, under in CITING:
        for key, table, parcel in CITED:
            keys = [*under, key]
            if dialect == "postgresql":
                path, template = "{" + ",".join(keys) + "}", POSTGRESQL_CITED
            else:
                path, template = "$." + ".".join(keys), SQLITE_CITED
            selects.append(template.format(path=path, table=table, parcel=parcel, where=where))
    return selects


# A close for the courier's, a last seq declared's: the parcels of the shift's events.
CLOSES = """SELECT s.tracking_no AS tracking_no, e.id AS id FROM audit_entry e
    JOIN scan_event s ON s.shift_id = {shift_id}
    WHERE e.action IN ('shift_closed_for_courier', 'shift_last_seq_declared')
        AND e.subject_type = 'shift'"""
SHIFT_ID = {
    "postgresql": "CASE WHEN e.subject_key ~ '^[0-9]{1,9}$' THEN e.subject_key::int END",
    "sqlite": "CAST(e.subject_key AS INTEGER)",
}
# A withdrawal's: those of the shift's latest reopening before it (filed first, above).
WITHDRAWALS = """SELECT p.tracking_no AS tracking_no, w.id AS id FROM audit_entry w
    JOIN audit_entry_parcel p ON p.entry_id = (
        SELECT max(r.id) FROM audit_entry r
        WHERE r.action = 'shift_reopened' AND r.subject_type = 'shift'
            AND r.subject_key = w.subject_key AND r.id < w.id)
    WHERE w.action = 'shift_reopening_withdrawn' AND w.subject_type = 'shift'"""


def _filed(parcels: str) -> str:
    """The INSERT of ``parcels``' rows not there yet that name a tracking number as one is
    stored (1 to 40 characters)."""
    return f"""INSERT INTO {TABLE} (tracking_no, entry_id)
    SELECT DISTINCT q.tracking_no, q.id FROM ({parcels}) q
    WHERE length(q.tracking_no) BETWEEN 1 AND 40 AND NOT EXISTS (
        SELECT 1 FROM {TABLE} x WHERE x.tracking_no = q.tracking_no AND x.entry_id = q.id)"""


def upgrade() -> None:
    dialect = "postgresql" if op.get_bind().dialect.name == "postgresql" else "sqlite"
    for parcels in (*_cited(dialect), CLOSES.format(shift_id=SHIFT_ID[dialect]), WITHDRAWALS):
        op.execute(_filed(parcels))


def downgrade() -> None:
    """Nothing to undo: the rows are a finding aid the version before reads as any other
    entry's (``GET /audit?tracking_no=``), and it changes none."""
