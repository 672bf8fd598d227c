"""Which handovers a sign-off of several together takes, and what it tells the manager
of those it leaves (``sync.signoffs.not_clean``), on balances built by hand."""

from __future__ import annotations

from models import FlagStatus, Shift, ShiftStatus
from sync.balances import HandoverRead
from sync.handover import Balance, BalanceStatus, Discrepancy, discrepancies_decided
from sync.signoffs import not_clean


def unbalanced(*discrepancies: Discrepancy) -> Balance:
    return Balance(
        shift_id=7,
        status=BalanceStatus.UNBALANCED,
        checked_out=3,
        delivered=1,
        delivered_without_pod=1,
        unattended=0,
        unattended_without_consent=0,
        returned=0,
        missing=1,
        not_checked_out=0,
        missing_seqs=[],
        missing_seq_count=0,
        discrepancies=list(discrepancies),
    )


def test_a_refusal_for_discrepancies_still_to_decide_names_those_not_the_decided_ones() -> None:
    """At 19:00 the manager signs off together the handovers whose discrepancies they
    have all decided; one of them has a flag opened again since (or acknowledged only).
    The refusal said "1 of its 2 discrepancies still to decide (1 delivered_without_pod
    (PAR1), 1 missing_at_handover (PAR2))": it named the one already resolved beside
    the one still to decide, and the manager opened the resolved one first. It names
    those still to decide, open or acknowledged, and only those."""
    balance = unbalanced(
        Discrepancy("delivered_without_pod", "PAR1", 11, FlagStatus.RESOLVED, (1,)),
        Discrepancy("missing_at_handover", "PAR2", 12, FlagStatus.OPEN, (2,)),
        Discrepancy("missing_at_handover", "PAR3", 13, FlagStatus.ACKNOWLEDGED, (3,)),
    )
    shift = Shift(id=7, status=ShiftStatus.CLOSED)

    refusal = not_clean(shift, HandoverRead(balance), decided=True)

    assert refusal is not None
    assert refusal.code == "discrepancies_to_decide"
    assert refusal.message == (
        "2 of its 3 discrepancies still to decide (2 missing_at_handover (PAR2, PAR3)): "
        "decide on them on its page, or sign it off on its own"
    )
    # Without the option, the balance's every discrepancy is named, as before.
    plain = not_clean(shift, HandoverRead(balance))
    assert plain is not None and plain.code == "balance_unbalanced"
    assert "1 delivered_without_pod (PAR1)" in plain.message


def test_a_refusal_counts_the_discrepancies_to_decide_when_none_is_decided() -> None:
    """A handover with one discrepancy, its flag opened again since it was resolved, was
    refused with "1 of its 1 discrepancies still to decide": it says "1 discrepancy"
    now, and "2 discrepancies" when neither of two is decided."""
    shift = Shift(id=7, status=ShiftStatus.CLOSED)
    one = unbalanced(Discrepancy("missing_at_handover", "PAR2", 12, FlagStatus.OPEN, (2,)))
    two = unbalanced(
        Discrepancy("missing_at_handover", "PAR2", 12, FlagStatus.OPEN, (2,)),
        Discrepancy("missing_at_handover", "PAR3", 13, FlagStatus.ACKNOWLEDGED, (3,)),
    )

    said = [not_clean(shift, HandoverRead(b), decided=True) for b in (one, two)]

    assert [refusal.message if refusal else None for refusal in said] == [
        "1 discrepancy still to decide (1 missing_at_handover (PAR2)): "
        "decide on it on its page, or sign it off on its own",
        "2 discrepancies still to decide (2 missing_at_handover (PAR2, PAR3)): "
        "decide on them on its page, or sign it off on its own",
    ]


def test_a_resolved_unknown_parcel_or_another_stations_flag_is_not_decided_here() -> None:
    """Resolved, neither counts as decided for a sign-off of those decided: an
    ``unknown_parcel`` stands for scans not judged yet (intake judges them), and another
    station's flag is that station's manager's decision. The refusal says why of each."""
    balance = unbalanced(
        Discrepancy("delivered_without_pod", "PAR1", 11, FlagStatus.RESOLVED, (1,)),
        Discrepancy("unknown_parcel", "PAR2", 12, FlagStatus.RESOLVED, (2,)),
        Discrepancy(
            "delivered_without_pod", "PAR3", 13, FlagStatus.RESOLVED, (3,), flag_elsewhere=True
        ),
    )
    shift = Shift(id=7, status=ShiftStatus.CLOSED)

    assert discrepancies_decided(balance) == [11]
    refusal = not_clean(shift, HandoverRead(balance), decided=True)

    assert refusal is not None and refusal.code == "discrepancies_to_decide"
    assert refusal.message == (
        "2 of its 3 discrepancies still to decide (1 unknown_parcel (PAR2), "
        "1 delivered_without_pod (PAR3)); unknown_parcel (PAR2) is resolved, but take the "
        "parcel in: intake judges its scans; delivered_without_pod (PAR3) is resolved, but "
        "its flag is another station's: that station's manager decides it: decide on them "
        "on its page, or sign it off on its own"
    )
    # Only the decidable ones resolved: signed off with the others decided.
    decided_here = unbalanced(balance.discrepancies[0])
    assert not_clean(shift, HandoverRead(decided_here), decided=True) is None
