"""Counters: counts by name and by reason, as the parts keep them."""

from __future__ import annotations

from node.system.counters import Counters


def test_plain_and_reason_counts() -> None:
    c = Counters(["sent"])
    assert c["sent"] == 0 and c.get("never") == 0
    c.inc("sent")
    c.inc("sent", 4)
    c.inc("dropped", reason="stale")
    c.inc("dropped", 2, reason="replay")
    assert c["sent"] == 5
    assert c.get("dropped", "stale") == 1 and c.get("dropped", "replay") == 2
    assert c["dropped"] == 3  # the sum over reasons
    assert c.get("dropped", "other") == 0
    assert dict(c.plain()) == {"sent": 5}
    assert dict(c.by_reason()) == {"dropped": {"stale": 1, "replay": 2}}
    assert c.as_dict() == {"sent": 5, "dropped.stale": 1, "dropped.replay": 2}


def test_reason_families_named_up_front_exist_empty() -> None:
    c = Counters(by_reason=["dropped"])
    assert dict(c.by_reason()) == {"dropped": {}} and c["dropped"] == 0
