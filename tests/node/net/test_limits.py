"""The bounds in node/net/limits.py and node/dht/guard.py, with time as an argument."""

from __future__ import annotations

from node.dht.guard import AMPLIFICATION, SenderGuard
from node.net.limits import FailureSummary, HandshakeGate, InboundBudget, RateLimiter


def test_budget_lets_only_the_oldest_holder_read_when_full() -> None:
    budget = InboundBudget(100)
    a, b, c = object(), object(), object()
    woken: list[str] = []
    budget.hold(a, 60)
    budget.hold(b, 50)  # over: 110
    assert budget.may_read(a) and not budget.may_read(b) and not budget.may_read(c)
    budget.when_available(lambda: woken.append("b"))
    budget.hold(a, 70)  # growing does not wake anyone
    assert woken == []
    budget.hold(a, 0)  # a's frame was delivered
    assert woken == ["b"] and budget.used == 50 and budget.may_read(b) and budget.may_read(c)


def test_rate_limiter_refills_and_forgets_old_keys() -> None:
    limiter = RateLimiter(rate=10, burst=3, max_keys=2)
    assert [limiter.allow("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("x", 0.1)  # one token back after 0.1 s
    limiter.allow("y", 0.1)
    limiter.allow("z", 0.1)
    assert len(limiter) == 2


def test_handshake_gate_per_source_and_total() -> None:
    gate = HandshakeGate(total=3, per_source=2)
    assert gate.enter("a") and gate.enter("a") and not gate.enter("a")
    assert gate.enter("b") and not gate.enter("c")  # total reached
    gate.leave("a")
    assert gate.enter("c") and gate.pending == 3


def test_failures_are_summarised_once_a_minute_per_source() -> None:
    summary = FailureSummary(interval=60)
    assert summary.record("10.0.0.9", "bad tls", 0.0) == (1, "bad tls")
    assert all(summary.record("10.0.0.9", "bad tls", t) is None for t in range(1, 30))
    assert summary.record("10.0.0.8", "other", 5.0) == (1, "other")
    assert summary.record("10.0.0.9", "last", 61.0) == (30, "last")


def test_sender_guard_bounds() -> None:
    guard = SenderGuard(max_verifying=2, welcome_every=600, retry_verify_after=60)
    assert guard.start_verify(("h", 1), 0) and not guard.start_verify(("h", 1), 0)
    assert guard.start_verify(("h", 2), 0) and not guard.start_verify(("h", 3), 0)  # 2 in flight at most
    guard.verified(("h", 1), False, 1.0)
    assert not guard.start_verify(("h", 1), 30.0) and guard.start_verify(("h", 1), 62.0)
    assert guard.should_welcome(b"n", 0) and not guard.should_welcome(b"n", 300) and guard.should_welcome(b"n", 601)
    cookie = guard.cookie(("h", 1), b"id", 100.0)
    assert guard.cookie_ok(cookie, ("h", 1), b"id", 130.0)
    assert not guard.cookie_ok(cookie, ("h", 2), b"id", 130.0) and not guard.cookie_ok(cookie, ("h", 1), b"x", 130.0)
    assert not guard.cookie_ok(cookie, ("h", 1), b"id", 300.0)  # expired
    assert guard.reply_budget(200, verifying=True) < AMPLIFICATION * 200 - 200
