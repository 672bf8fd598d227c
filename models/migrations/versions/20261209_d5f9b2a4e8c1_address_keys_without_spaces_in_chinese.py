"""Standing consents' address keys ignore spaces beside Chinese and Japanese characters

A standing consent covers the parcels to its phone at its address, compared by a key
(``sync.consents.address_key``: NFKC, case-folded, punctuation and spacing folded). A
space counted wherever it stood, and Chinese is written without spaces between words:
the recipient's app recorded "北京市 朝阳区 建国路 1 号" as typed, the sender's manifest
had "北京市朝阳区建国路1号", and the consent the API had accepted covered none of the
recipient's parcels. The key now drops a space beside a Han, hiragana or katakana
character; parcels' keys are computed when compared, consents' are stored, and are
computed again here.

With a copy of the key as it is at this revision (``_key``) and of the one before
(``_key_before``, for the downgrade): SQL cannot say NFKC alike on both backends, so
the consents that have an address are read and written back in batches of ``BATCH``
by id, only those whose key changes; the batches go on until none is left, so they take
the consents recorded since the first. Running it again computes the same keys. A
standing consent the version before records after the last batch, in the minutes of
the rollout, keeps the key that version computed: the same, unless its address has a
space beside a Chinese character.

On PostgreSQL each batch's UPDATEs commit on their own (an autocommit block): a
revocation of a standing consent waits for no more than a batch.

No parcel is judged again here: a drop judged unauthorized because its recipient's
standing consent was keyed with the spaces stays flagged until ``courier-api rejudge``
runs after the upgrade, with the new version serving.

Revision ID: d5f9b2a4e8c1
Revises: c4e8a1f3d7b9
Create Date: 2026-12-09 10:00:00.000000
"""

import re
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import sqlalchemy as sa
from alembic import op

revision: str = "d5f9b2a4e8c1"
down_revision: str | None = "c4e8a1f3d7b9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 1_000  # consents read per batch
_NOT_WORD = re.compile(r"[\W_]+")
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_BESIDE_UNSPACED = re.compile(rf"(?<=[{_UNSPACED}]) | (?=[{_UNSPACED}])")

WITH_ADDRESS = sa.text(
    "SELECT id, address, address_key FROM consent "
    "WHERE address IS NOT NULL AND id > :after ORDER BY id LIMIT :batch"
)
SET_KEY = sa.text("UPDATE consent SET address_key = :key WHERE id = :id")


def _key_before(address: str) -> str:
    """``sync.consents.address_key`` as it was before this revision."""
    folded = unicodedata.normalize("NFKC", address).casefold()
    return _NOT_WORD.sub(" ", folded).strip()[:400]


def _key(address: str) -> str:
    """``sync.consents.address_key`` as it is at this revision."""
    folded = unicodedata.normalize("NFKC", address).casefold()
    spaced = _NOT_WORD.sub(" ", folded).strip()
    return _BESIDE_UNSPACED.sub("", spaced)[:400]


def _outside_transaction() -> AbstractContextManager[None]:
    """PostgreSQL: an autocommit block, each batch's statements committed on their own;
    SQLite: the migration's own transaction."""
    if op.get_bind().dialect.name == "postgresql":
        return op.get_context().autocommit_block()
    return nullcontext()


def _rekey(key: Callable[[str], str]) -> None:
    bind = op.get_bind()
    after = 0
    while rows := bind.execute(WITH_ADDRESS, {"after": after, "batch": BATCH}).all():
        changed = [
            {"id": row_id, "key": key(address)}
            for row_id, address, stored in rows
            if key(address) != stored
        ]
        if changed:
            bind.execute(SET_KEY, changed)
        after = rows[-1][0]


def upgrade() -> None:
    with _outside_transaction():
        _rekey(_key)


def downgrade() -> None:
    with _outside_transaction():
        _rekey(_key_before)
