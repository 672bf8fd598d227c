"""Shared by the intake endpoint and ``courier-api import-parcels``: raw items in, results out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from flask import current_app
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from courier_api.api.parcels.schemas import RejectedItem
from courier_api.config import policy_of
from sync.parcels import (
    IntakeResult,
    IntakeRules,
    IntakeScope,
    IntakeStatus,
    ParcelDraft,
    intake_parcels,
)
from sync.tracking import TrackingNumberPolicy


def intake_rules() -> IntakeRules:
    config = current_app.config
    return IntakeRules(
        tracking=TrackingNumberPolicy.from_patterns(config["DOMESTIC_TRACKING_PATTERNS"]),
        phone_region=config["DEFAULT_PHONE_REGION"],
        policy=policy_of(config),
    )


def take_in_and_commit(
    *,
    session: Session,
    items: Sequence[ParcelDraft | RejectedItem],
    scope: IntakeScope,
    changed_by: int | None,
) -> list[dict[str, Any]]:
    """``take_in`` and commit; retried once when a concurrent intake created the same parcel.

    Two callers sending the same new tracking number race on its unique index:
    the loser rolls back and runs again, now finding the parcel (``unchanged`` or
    ``updated``) instead of failing its whole batch with a conflict.
    """
    try:
        return _take_in_committed(session=session, items=items, scope=scope, changed_by=changed_by)
    except IntegrityError:
        session.rollback()
    # a real conflict raises
    return _take_in_committed(session=session, items=items, scope=scope, changed_by=changed_by)


def _take_in_committed(
    *,
    session: Session,
    items: Sequence[ParcelDraft | RejectedItem],
    scope: IntakeScope,
    changed_by: int | None,
) -> list[dict[str, Any]]:
    rows = take_in(session=session, items=items, scope=scope, changed_by=changed_by)
    session.commit()
    return rows


def take_in(
    *,
    session: Session,
    items: Sequence[ParcelDraft | RejectedItem],
    scope: IntakeScope,
    changed_by: int | None,
) -> list[dict[str, Any]]:
    """Run the drafts through the domain rules; report shape errors in the same list.
    ``changed_by``: the user taking them in (None: the command line), for the audit log."""
    drafts = [(i, item) for i, item in enumerate(items) if isinstance(item, ParcelDraft)]
    by_index: dict[int, dict[str, Any]] = {
        result.index: result_row(result)
        for result in intake_parcels(
            session=session,
            drafts=drafts,
            rules=intake_rules(),
            scope=scope,
            changed_by=changed_by,
        )
    }
    for i, item in enumerate(items):
        if isinstance(item, RejectedItem):
            by_index[i] = shape_error_row(i, item)
    return [by_index[i] for i in sorted(by_index)]


def result_row(result: IntakeResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "index": result.index,
        "tracking_no": result.tracking_no,
        "status": result.status.value,
    }
    if result.error is not None:
        row["error"] = {"code": result.error.code, "message": result.error.message}
        if result.error.field:
            row["error"]["errors"] = {result.error.field: [result.error.message]}
    return row


def shape_error_row(index: int, item: RejectedItem) -> dict[str, Any]:
    raw_no = item.raw.get("tracking_no") if isinstance(item.raw, dict) else None
    return {
        "index": index,
        "tracking_no": raw_no if isinstance(raw_no, str) else None,
        "status": IntakeStatus.REJECTED.value,
        "error": {
            "code": "validation_error",
            "message": "the item did not validate; see errors",
            "errors": item.messages
            if isinstance(item.messages, dict)
            else {"_item": item.messages},
        },
    }


def count_statuses(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(row["status"] for row in rows)
    return {status.value: counts.get(status.value, 0) for status in IntakeStatus}
