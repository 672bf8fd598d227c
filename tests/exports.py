"""Reading the proofs' CSV export as an auditor's tools would."""

from __future__ import annotations

import csv
import io

from courier_api.api.proofs.routes import EXPORT_COMPLETE


def exported(text: str) -> list[dict[str, str]]:
    """The proofs of an export's CSV, its last line checked: the line saying the export
    is complete, with how many proofs it holds (a file cut short has none)."""
    *lines, last = csv.reader(io.StringIO(text, newline=""))
    header, *records = lines
    assert len(last) == 1 and last[0].startswith(f"{EXPORT_COMPLETE}: {len(records)} proof")
    return [dict(zip(header, record, strict=True)) for record in records]
