"""The round-trip table: medians of the last samples, bounded, forgetting departed peers."""

from __future__ import annotations

from node.cluster.rtt import MAX_PEERS, SAMPLES, RttTable, rtt_problem


def test_median_of_the_last_samples() -> None:
    t = RttTable()
    a = "a" * 64
    for ms in [100.0, 1.0, 2.0, 3.0, 2.5, 2.0]:  # the first falls out of the last SAMPLES
        t.add(a, ms)
    assert SAMPLES == 5 and t.medians() == {a: 2.0}
    assert rtt_problem(t.medians()) is None


def test_bounded_and_forgets_departed_peers() -> None:
    t = RttTable()
    ids = [f"{i:064x}" for i in range(MAX_PEERS + 8)]
    for nid in ids:
        t.add(nid, 1.0)
    assert len(t.medians()) == MAX_PEERS and rtt_problem(t.medians()) is None
    t.forget_except(set(ids[:2]))
    assert set(t.medians()) == set(ids[:2])
