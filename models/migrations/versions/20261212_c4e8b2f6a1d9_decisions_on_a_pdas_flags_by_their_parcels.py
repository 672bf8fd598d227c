"""Decisions on a PDA's flags by the parcels they cite by the PDA's ids

A PDA's ``clock_jump`` and ``seq_conflict`` cite its events by its own ids for them
(``client_event_ids``), its ``wrong_shift`` by their seqs; a delivery's proof lists them
as citing it (``sync.proofs.cites``). ``a3f7c9e1d5b8`` filed a manager's decision on a
flag of no one parcel under the parcels of the events and rejected events it covered
by their ids only, so the decisions on these flags stayed out of the parcels'
histories (``GET /audit?tracking_no=``). The service now files them as it appends them
(``sync.flags._parcels_cited``); the decisions written before get theirs here, from
what they covered (``details.decided_on``) and the flag's subject they record
(``details.subject_type``, ``details.subject_key``): the PDA's events by its ids for
them (a device's flag, or an event's: ``<device>/<id>``, ``<device>#<seq>``), and a
device's flag's events by their seqs.

No schema changes; outside the hash chain, as ``b1d7e3a9c5f2``'s rows. As
``a3f7c9e1d5b8``'s, each statement reads only the decisions
(``ix_audit_entry_action``), finds their events by the PDA's unique keys
(``uq_scan_event_device_event``, ``uq_scan_event_device_id_seq``), writes only rows not
there yet (run again, the same end), and holds no lock an append waits for.

Revision ID: c4e8b2f6a1d9
Revises: f3b8d6a2c4e1
Create Date: 2026-12-12 09:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "c4e8b2f6a1d9"
down_revision: str | None = "f3b8d6a2c4e1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "audit_entry_parcel"
DECISIONS = (
    "e.action IN ('flag_acknowledged', 'flag_resolved') AND e.tracking_no IS NULL"
    " AND {subject_type} IN ({subjects})"
)
# The PDA of a device's or a device's event's flag: its id, which holds no '/' or '#'
# (``sync.directory.DEVICE_ID``), before the event's id or seq.
POSTGRESQL = {
    "subject_type": "e.details ->> 'subject_type'",
    "device": "split_part(replace(e.details ->> 'subject_key', '#', '/'), '/', 1)",
    "elements": """CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(e.details #> '{{decided_on,{key}}}') = 'array'
        THEN e.details #> '{{decided_on,{key}}}' ELSE '[]'::jsonb END) AS n(value)""",
    "client_event_id": """CASE WHEN jsonb_typeof(n.value) = 'string' AND (n.value #>> '{}')
        ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$'
        THEN (n.value #>> '{}')::uuid END""",
    "seq": """CASE WHEN jsonb_typeof(n.value) = 'number'
        AND (n.value #>> '{}') ~ '^[0-9]{1,18}$' THEN (n.value #>> '{}')::bigint END""",
    "filter": "",
}
SQLITE = {
    "subject_type": "json_extract(e.details, '$.subject_type')",
    "device": "substr(json_extract(e.details, '$.subject_key'), 1, instr(replace("
    "json_extract(e.details, '$.subject_key') || '/', '#', '/'), '/') - 1)",
    "elements": ", json_each(e.details, '$.decided_on.{key}') n",
    # SQLAlchemy's Uuid is stored as 32 hex digits on SQLite.
    "client_event_id": "lower(replace(n.value, '-', ''))",
    "seq": "n.value",
    "filter": " AND json_type(e.details, '$.decided_on.{key}') = 'array' AND n.type = '{type}'",
}
CITED = """SELECT s.tracking_no AS tracking_no, e.id AS id FROM audit_entry e {elements}
    JOIN scan_event s ON s.device_id = {device} AND s.{column} = {value}
    WHERE {decisions}{filter}"""


def _cited(sql: dict[str, str]) -> list[str]:
    """The SELECTs of the parcels the decisions cite by the PDA's ids and by its seqs."""
    selects = []
    for key, column, type_, subjects in (
        ("client_event_ids", "client_event_id", "text", "'device', 'event'"),
        ("seqs", "seq", "integer", "'device'"),
    ):
        selects.append(
            CITED.format(
                elements=sql["elements"].format(key=key),
                device=sql["device"],
                column=column,
                value=sql[column],
                decisions=DECISIONS.format(subject_type=sql["subject_type"], subjects=subjects),
                filter=sql["filter"].format(key=key, type=type_),
            )
        )
    return selects


def _filed(parcels: str) -> str:
    """The INSERT of ``parcels``' rows not there yet that name a tracking number as one is
    stored (1 to 40 characters)."""
    return f"""INSERT INTO {TABLE} (tracking_no, entry_id)
    SELECT DISTINCT q.tracking_no, q.id FROM ({parcels}) q
    WHERE length(q.tracking_no) BETWEEN 1 AND 40 AND NOT EXISTS (
        SELECT 1 FROM {TABLE} x WHERE x.tracking_no = q.tracking_no AND x.entry_id = q.id)"""


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for parcels in _cited(POSTGRESQL if postgresql else SQLITE):
        op.execute(_filed(parcels))


def downgrade() -> None:
    """Nothing to undo: the rows are a finding aid the version before reads as any other
    entry's (``GET /audit?tracking_no=``), and it changes none."""
