"""What the pages' GET filters and POST forms accept.

HTML forms send every field, empty ones as ``""``: empty means "not given". The
filters are those of the API (``/api/v1/flags``, ``/api/v1/proofs``), except that
dates are local days of the station (a date picker), not instants with an offset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import marshmallow as ma

from courier_api.api.fields import MAX_ID, After, Id, Text
from courier_api.api.shifts.schemas import CloseShiftIn
from models import FlagSeverity, FlagStatus
from sync.errors import InvalidInput
from sync.flags import KINDS
from sync.manager_text import MAX_NOTE_LENGTH
from sync.proofs import METHODS, SEARCHABLE_FLAG_KINDS


class _Form(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE


class DayArgs(_Form):
    station = Id()
    date = ma.fields.Date()


class FlagKind(Text):
    """A flag's kind as its code (``unauthorized_locker_drop``) or as the pages write it
    ("Unauthorized locker drop"), in any case: loaded as the code. One that is not among
    ``kinds`` (every kind, by default) is refused naming them, rather than matching no
    flag."""

    default_error_messages = {"unknown": "no flag is of kind “{text}”; the kinds are: {kinds}"}

    def __init__(self, kinds: Sequence[str] = KINDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = kinds

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        code = "_".join(text.lower().replace("_", " ").replace("-", " ").split())
        if code not in self.kinds:
            named = ", ".join(kind.replace("_", " ") for kind in self.kinds)
            raise self.make_error("unknown", text=text, kinds=named)
        return code


# The flag queue's status choices beyond a flag's own: ``standing``, the default, every
# flag whose cause stands (open, acknowledged, resolved), not those the system closed
# because the cause went away (a drop's consent pushed after it, an image uploaded after
# its delivery, a parcel a late batch accounted for at the handover); ``any``, all.
STANDING = "standing"
ANY_STATUS = "any"
# ``waiting``: open or acknowledged, what a board row counts as its open flags.
WAITING = "waiting"


class FlagFilter(_Form):
    station = Id()
    kind = FlagKind()
    severity = ma.fields.Enum(FlagSeverity, by_value=True)
    status = ma.fields.String(
        validate=ma.validate.OneOf(
            [STANDING, WAITING, ANY_STATUS, *(s.value for s in FlagStatus)]
        ),
        load_default=STANDING,
    )
    courier_id = Id()
    shift_id = Id()
    tracking_no = Text(validate=ma.validate.Length(max=40))  # a parcel's flags
    raised_from = ma.fields.Date()  # the station's local day, inclusive
    raised_to = ma.fields.Date()  # inclusive too: the form says "from ... to ..."
    after = After()  # a link given before ``cursor``: where its flag stands now
    # The previous page's next (``sync.flags.FlagCursor``): where its last flag stood
    # when shown; by its id (``after``), a flag opened again meanwhile put the next page
    # back at the top, and it listed again the flags shown.
    cursor = Text(validate=ma.validate.Length(max=200))


class ProofFilter(_Form):
    station = Id()
    tracking_no = Text(validate=ma.validate.Length(max=40))
    courier_id = Id()
    occurred_from = ma.fields.Date()
    occurred_to = ma.fields.Date()
    flag_kind = FlagKind(SEARCHABLE_FLAG_KINDS)
    method = ma.fields.String(validate=ma.validate.OneOf(list(METHODS)))
    # The previous page's next (``sync.proofs.SearchCursor``): a walk by id (``after``)
    # missed a delivery whose push committed late below the pages shown.
    cursor = Text(validate=ma.validate.Length(max=200))


# An id as the pages write it: ASCII digits, no more than an id column holds.
_TYPED_ID = re.compile(r"[0-9]{1,10}")


class DecisionForm(_Form):
    """Acknowledge or resolve a flag, on the evidence the page showed."""

    note = Text(load_default=None, validate=ma.validate.Length(max=MAX_NOTE_LENGTH))
    evidence_version = Text(load_default=None, validate=ma.validate.Length(max=64))


class SignOffForm(_Form):
    """The shift page's sign-off, with what the page showed: the balance's version, its
    PDA's events rejected, the flags naming it still waiting (``open_flags``: their
    ids, comma-separated, empty for none) and its proof images missing."""

    note = Text(load_default=None, validate=ma.validate.Length(max=MAX_NOTE_LENGTH))
    force_reason = Text(load_default=None, validate=ma.validate.Length(max=MAX_NOTE_LENGTH))
    balance_version = Text(load_default=None, validate=ma.validate.Length(max=64))
    rejected_events = ma.fields.Integer(load_default=None, validate=ma.validate.Range(min=0))
    open_flags = Text(load_default=None, validate=ma.validate.Length(max=20000))
    images_missing = ma.fields.Integer(load_default=None, validate=ma.validate.Range(min=0))

    @ma.post_load
    def flag_ids(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        typed = data.get("open_flags")
        if typed is not None:
            parts = [part.strip() for part in typed.split(",") if part.strip()]
            # ASCII digits, as the page writes ids: ``str.isdigit`` takes a superscript
            # for one, which ``int`` refuses (a 500 page), as it does thousands of digits.
            if not all(_TYPED_ID.fullmatch(part) and int(part) <= MAX_ID for part in parts):
                raise ma.ValidationError("flag ids, comma-separated", "open_flags")
            data["open_flags"] = [int(part) for part in parts]
        return data


def open_flags_seen(loaded: Mapping[str, Any], sent: Mapping[str, str]) -> list[int] | None:
    """The flags a sign-off's page showed waiting (``SignOffForm.open_flags``), as the
    sign-off compares them: sent empty, none waited (``[]``), compared all the same. Not
    None, which ``parse`` makes of an empty field and which compares nothing: a page
    that showed no flag waiting signed off past a flag raised since."""
    if loaded.get("open_flags") is None and "open_flags" in sent:
        return []
    flag_ids: list[int] | None = loaded.get("open_flags")
    return flag_ids


class LostSeqsForm(_Form):
    """The shift page's write-off of its PDA's lost seqs: ``3-4, 9`` and a reason."""

    seqs = Text(load_default=None, validate=ma.validate.Length(max=2000))
    reason = Text(load_default=None, validate=ma.validate.Length(max=MAX_NOTE_LENGTH))


_SEQ_RANGE = re.compile(r"([0-9]{1,10})(?:-([0-9]{1,10}))?")


def seq_ranges_typed(text: str | None) -> list[tuple[int, int]]:
    """``3-4, 9`` as ``[(3, 4), (9, 9)]``: seqs and ranges, by commas or spaces; a
    range's dash a hyphen, or the en or em dash the page writes runs with
    (``courier_api.web.views.seq_ranges``: 3–4), so that seqs copied from it are taken."""
    found = []
    for part in re.split(r"[,\s]+", re.sub(r"\s*[-–—]\s*", "-", (text or "").strip())):
        if not part:
            continue
        match = _SEQ_RANGE.fullmatch(part)
        if match is None:
            raise InvalidInput(
                f"seqs: {part!r} is no seq or range of seqs (write 3-4, 9)",
                code="invalid_form",
                field="seqs",
            )
        first = int(match[1])
        found.append((first, int(match[2]) if match[2] else first))
    return found


class SignOffCleanForm(_Form):
    """The board's sign-off of the checked shifts: one note. The boxes are
    ``checked_shifts``; the day shown, to come back to, is read with ``DayArgs``."""

    note = Text(load_default=None, validate=ma.validate.Length(max=MAX_NOTE_LENGTH))


_SHIFT_ID = _TYPED_ID  # as the board writes it


def checked_shifts(boxes: Sequence[str]) -> dict[int, str]:
    """The board's checked boxes, each ``<shift id>:<balance version>`` as the row
    showed it: the shift ids with the version each was seen at. A box the board did not
    write (a superscript digit, which ``str.isdigit`` takes for one, or an id beyond
    the id column) is refused as no board row, before any query."""
    seen: dict[int, str] = {}
    for box in boxes:
        shift_id, _, version = box.partition(":")
        if (
            not _SHIFT_ID.fullmatch(shift_id)
            or int(shift_id) > MAX_ID
            or not version
            or len(version) > 64
        ):
            raise InvalidInput(f"shift: not a board row ({box[:40]!r})", field="shift")
        seen[int(shift_id)] = version
    return seen


class CloseShiftForm(_Form, CloseShiftIn):
    """The API's close (``last_seq``, optional), as the shift page's form sends it."""


class LoginForm(_Form):
    username = Text(load_default="", validate=ma.validate.Length(max=64))
    password = ma.fields.String(load_default="", validate=ma.validate.Length(max=1024))


def parse(schema: ma.Schema, source: Mapping[str, str]) -> dict[str, Any]:
    """The fields of ``source`` that are filled in, validated by ``schema``."""
    filled = {key: value.strip() for key, value in source.items() if value.strip()}
    if "password" in source:
        filled["password"] = source["password"]  # spaces may be part of a password
    try:
        loaded: dict[str, Any] = schema.load(filled)
    except ma.ValidationError as exc:
        messages = exc.normalized_messages()
        field = sorted(messages)[0]
        problem = messages[field]
        text = problem[0] if isinstance(problem, list) else str(problem)
        raise InvalidInput(f"{field}: {text}", code="invalid_form", field=field) from None
    return loaded
