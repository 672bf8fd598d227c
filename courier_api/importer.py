"""``courier-api import-parcels``: a CSV file through the same intake as the API."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy.orm import Session

from courier_api.api.parcels.intake import take_in_and_commit
from courier_api.api.parcels.schemas import ParcelIn, PerItemNested, RejectedItem
from sync import directory
from sync.errors import InvalidInput
from sync.parcels import IntakeScope, ParcelDraft
from sync.phones import mask_phones_in

REQUIRED_COLUMNS = ("tracking_no", "service_class", "recipient_name", "address")
OPTIONAL_COLUMNS = ("recipient_phone", "lat", "lon", "station", "courier")
EXTRA_FIELDS = "\x00extra"  # DictReader's key for fields beyond the header


@dataclass
class ImportOutcome:
    rows: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def rejected(self) -> int:
        return self.counts["rejected"]

    def summary(self) -> str:
        parts = ", ".join(
            f"{self.counts[s]} {s}" for s in ("created", "updated", "unchanged", "rejected")
        )
        rows = "1 row" if self.rows == 1 else f"{self.rows} rows"
        return f"parcels: {rows} read, {parts}"


def import_csv(
    handle: IO[str],
    *,
    session: Session,
    default_station: str | None,
    batch_size: int,
    progress: Callable[[str], None],
) -> ImportOutcome:
    """Take in the rows of ``handle`` in committed batches of ``batch_size``."""
    outcome = ImportOutcome()
    reader = csv.DictReader(handle, restkey=EXTRA_FIELDS, skipinitialspace=True)
    try:
        _import_rows(
            reader,
            outcome,
            session=session,
            default_station=default_station,
            batch_size=batch_size,
            progress=progress,
        )
    except UnicodeDecodeError:
        raise InvalidInput(
            f"the file is not UTF-8 text (after line {reader.line_num}; {outcome.rows} rows "
            "were taken in before it): save it as UTF-8, e.g. Excel's 'CSV UTF-8'",
            code="invalid_csv_encoding",
        ) from None
    return outcome


def _import_rows(
    reader: csv.DictReader[str],
    outcome: ImportOutcome,
    *,
    session: Session,
    default_station: str | None,
    batch_size: int,
    progress: Callable[[str], None],
) -> None:
    if reader.fieldnames is not None:
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    _check_header(reader.fieldnames)
    station_id = (
        directory.get_station_by_code(session=session, code=default_station).id
        if default_station
        else None
    )
    scope = IntakeScope(default_station_id=station_id, allowed_station_ids=None)
    batch: list[ParcelDraft | RejectedItem] = []
    line_numbers: list[int] = []
    loader = PerItemNested(ParcelIn)

    def flush() -> None:
        # No user signs in at the command line: its updates' audit entries name none.
        rows = take_in_and_commit(session=session, items=batch, scope=scope, changed_by=None)
        for row in rows:
            outcome.counts[row["status"]] += 1
            if row["status"] == "rejected":
                line = line_numbers[row["index"]]
                # A refused phone is echoed masked, like every log line: the operator's
                # console may be captured into one.
                reason = mask_phones_in(_describe(row["error"]))
                progress(f"line {line}: {row['tracking_no'] or '?'}: {reason}")
        outcome.rows += len(batch)
        progress(f"... {outcome.summary()}")  # so far: the last one repeats the summary
        batch.clear()
        line_numbers.clear()

    for record in reader:
        batch.append(_load_row(record, loader))
        line_numbers.append(reader.line_num)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()


def _load_row(record: dict[str, Any], loader: PerItemNested) -> ParcelDraft | RejectedItem:
    """One CSV row as an intake item; a row with more non-empty fields than the header
    is refused whole (an unquoted comma in an address would otherwise cut it short)."""
    extra = [value for value in record.pop(EXTRA_FIELDS, None) or [] if value.strip()]
    if extra:
        return RejectedItem(
            raw=record,
            messages={
                "_row": [
                    f"{len(extra)} more field(s) than the header; quote values that contain commas"
                ]
            },
        )
    cleaned = {
        key: value.strip()
        for key, value in record.items()
        if value is not None and value.strip() != ""
    }
    loaded: ParcelDraft | RejectedItem = loader.deserialize(cleaned)
    return loaded


def _check_header(fieldnames: Any) -> None:
    columns = [name.strip() for name in fieldnames or []]
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    unknown = [name for name in columns if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing columns: {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown columns: {', '.join(unknown)}")
        # A file saved without its header shows its first row here: phones masked.
        raise InvalidInput(
            mask_phones_in(
                "CSV header: "
                + "; ".join(problems)
                + f" (expected {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})"
            ),
            code="invalid_csv_header",
        )


def _describe(error: dict[str, Any]) -> str:
    details = error.get("errors")
    if not details:
        return str(error["message"])
    return "; ".join(
        f"{name}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
        for name, msgs in details.items()
    )
