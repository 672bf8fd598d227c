"""What a manager types to explain a decision: a flag's note, a sign-off's note and its
reason to sign off anyway, why a PDA's seqs are lost. One length limit and one rule for
blank text, so that the API's schemas, the pages' forms and the services agree."""

from __future__ import annotations

from sync.errors import InvalidInput

MAX_NOTE_LENGTH = 2000


def manager_text(
    value: str | None, field: str, *, required: bool, missing: str | None = None
) -> str | None:
    """``value`` trimmed; blank is absent, refused when ``required`` (``{field}_required``,
    ``missing`` its message when given), and longer than ``MAX_NOTE_LENGTH``
    refused (``{field}_too_long``)."""
    text = (value or "").strip()
    if not text:
        if required:
            message = missing or f"{field} is required"
            raise InvalidInput(message, code=f"{field}_required", field=field)
        return None
    if len(text) > MAX_NOTE_LENGTH:
        raise InvalidInput(
            f"the {field} is longer than {MAX_NOTE_LENGTH} characters",
            code=f"{field}_too_long",
            field=field,
        )
    return text
