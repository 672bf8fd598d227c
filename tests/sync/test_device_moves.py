"""What of a PDA's seqs keeps it at its station (``sync.device_moves``)."""

from sync.device_moves import unsynced_seqs


def test_unsynced_seqs_are_the_gaps_and_the_seqs_declared_beyond_those_held() -> None:
    assert unsynced_seqs(0, [], 0) == []
    assert unsynced_seqs(9, [], 9) == []
    assert unsynced_seqs(9, [], 7) == []  # a close declaring fewer than held: nothing
    assert unsynced_seqs(9, [[3, 4], [7, 7]], 9) == [[3, 4], [7, 7]]
    assert unsynced_seqs(9, [[7, 8]], 12) == [[7, 8], [10, 12]]  # seq 9 is held
    assert unsynced_seqs(3, [[2, 2]], 5) == [[2, 2], [4, 5]]
