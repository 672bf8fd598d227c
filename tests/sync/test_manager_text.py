"""A manager's note or reason, wherever it is typed (a flag's decision, a sign-off, a
write-off of lost seqs), is read by one rule: trimmed, blank is absent, refused when
required and missing or when longer than the one limit the schemas and forms share."""

import pytest

from sync.errors import InvalidInput
from sync.manager_text import MAX_NOTE_LENGTH, manager_text


def test_text_is_trimmed_and_blank_is_absent() -> None:
    assert manager_text("  called the recipient \n", "note", required=False) == (
        "called the recipient"
    )
    assert manager_text(" \t", "note", required=False) is None
    assert manager_text(None, "note", required=False) is None


@pytest.mark.parametrize("blank", [None, "", "   "])
def test_missing_required_text_is_refused_naming_its_field(blank: str | None) -> None:
    with pytest.raises(InvalidInput) as raised:
        manager_text(blank, "reason", required=True, missing="say why the seqs are lost")
    assert (raised.value.code, raised.value.field) == ("reason_required", "reason")
    assert str(raised.value) == "say why the seqs are lost"
    with pytest.raises(InvalidInput, match="^note is required$"):
        manager_text(blank, "note", required=True)


def test_the_limit_is_on_the_trimmed_text() -> None:
    longest = "x" * MAX_NOTE_LENGTH
    assert manager_text(f"  {longest}  ", "force_reason", required=False) == longest
    with pytest.raises(InvalidInput) as raised:
        manager_text(longest + "x", "force_reason", required=False)
    assert (raised.value.code, raised.value.field) == ("force_reason_too_long", "force_reason")
