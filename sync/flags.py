"""Flags: discrepancies and violations, one per kind and subject (DESIGN.md "Flag").

Raising a flag that exists merges the new evidence into it instead of adding a
second one, so re-running a check or re-sending a batch never duplicates flags.
A flag whose cause went away is closed with the reason, never deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import Flag, FlagSeverity, FlagStatus

ACTIVE_STATUSES = (FlagStatus.OPEN, FlagStatus.ACKNOWLEDGED)


@dataclass(frozen=True)
class FlagSubject:
    type: str  # parcel | device | event
    key: str


@dataclass(frozen=True)
class RaisedFlag:
    flag: Flag
    new: bool  # created, or reopened after the system had closed it


def raise_flag(
    *,
    session: Session,
    kind: str,
    severity: FlagSeverity,
    subject: FlagSubject,
    station_id: int | None,
    evidence: dict[str, Any],
) -> RaisedFlag:
    """Create the flag, or merge ``evidence`` into the one that exists."""
    flag = _locked(session, kind, subject)
    if flag is None:
        flag = Flag(
            kind=kind,
            severity=severity,
            subject_type=subject.type,
            subject_key=subject.key,
            station_id=station_id,
            evidence=_merged({}, evidence),
        )
        try:
            with session.begin_nested():
                session.add(flag)
        except IntegrityError:  # raised by a concurrent transaction a moment ago
            flag = _locked(session, kind, subject)
            assert flag is not None
        else:
            return RaisedFlag(flag, new=True)
    merged = _merged(flag.evidence, evidence)
    if merged != flag.evidence:
        flag.evidence = merged
    if flag.status == FlagStatus.CLOSED:
        flag.status = FlagStatus.OPEN
        flag.closed_reason = None
        return RaisedFlag(flag, new=True)
    return RaisedFlag(flag, new=False)


def close_flag(*, session: Session, kind: str, subject: FlagSubject, reason: str) -> Flag | None:
    """Close an open flag because its cause disappeared; ``reason`` says why."""
    flag = _locked(session, kind, subject)
    if flag is None or flag.status not in ACTIVE_STATUSES:
        return flag
    flag.status = FlagStatus.CLOSED
    flag.closed_reason = reason
    return flag


def close_flags(
    *, session: Session, kind: str, subjects: Sequence[FlagSubject], reason: str
) -> list[Flag]:
    """``close_flag`` for many subjects of one kind, in one query per chunk."""
    closed = []
    by_type: dict[str, list[str]] = {}
    for subject in subjects:
        by_type.setdefault(subject.type, []).append(subject.key)
    for subject_type, keys in by_type.items():
        for start in range(0, len(keys), 900):
            for flag in session.scalars(
                select(Flag)
                .where(
                    Flag.kind == kind,
                    Flag.subject_type == subject_type,
                    Flag.subject_key.in_(keys[start : start + 900]),
                    Flag.status.in_(ACTIVE_STATUSES),
                )
                .with_for_update()
            ):
                flag.status = FlagStatus.CLOSED
                flag.closed_reason = reason
                closed.append(flag)
    return closed


def _locked(session: Session, kind: str, subject: FlagSubject) -> Flag | None:
    return session.scalar(
        select(Flag)
        .where(
            Flag.kind == kind,
            Flag.subject_type == subject.type,
            Flag.subject_key == subject.key,
        )
        .with_for_update()
    )


MAX_EVIDENCE_IDS = 200  # a flag's row stays small however often its cause recurs


def _merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Later evidence wins per key; lists of event and batch ids accumulate (the first
    ``MAX_EVIDENCE_IDS`` are kept: they are what an investigation starts from)."""
    merged = {**old, **new}
    for key in ("event_ids", "batch_ids"):
        if key in old or key in new:
            ids = sorted(
                set(old.get(key, [])) | set(new.get(key, [])),
                key=lambda v: (isinstance(v, str), v),
            )
            merged[key] = ids[:MAX_EVIDENCE_IDS]
    return merged
