"""The directory's pure parts: the shard key, this node's record, the status view."""

from __future__ import annotations

from node.cluster.directory import member_key, member_problem, member_record, status_view


def test_member_key_shards_by_first_hex_digit() -> None:
    assert member_key("a" * 64) == "members/a"
    assert member_key("0" + "f" * 63) == "members/0"


def test_member_record_carries_capabilities_and_identity() -> None:
    record = member_record(
        {"tflops": 1.5, "device": "cpu"}, node_id="ab" * 32, name="kitchen", version="0.1",
        protocol=1, address="10.0.0.2", peer_port=7420, dht_port=7421, state="ready",
        memory_free=100, rss=800 * 2**20, started_at=1000.0, now=1012.34, loop_lag_ms=3.14159,
        serving=[{"model": "c" * 64, "name": "m", "start": 0, "end": 4, "epoch": 1, "sessions": 0, "memory": 200},
                 {"model": "d" * 64, "name": "n", "start": 4, "end": 8, "epoch": 1, "sessions": 2, "memory": 100}],
    )
    assert record["tflops"] == 1.5 and record["addresses"] == ["10.0.0.2"]
    assert record["uptime_s"] == 12.3 and record["ts"] == 1012.34
    assert record["id"] == "ab" * 32 and record["state"] == "ready"
    # used: what the loaded layers hold (comparable with memory_allowed); the process's RSS apart
    assert record["memory_used"] == 300 and record["rss"] == 800 * 2**20
    assert record["loop_lag_ms"] == 3.1


def test_member_record_of_a_node_serving_nothing() -> None:
    record = member_record({}, node_id="ab" * 32, name="n", version="0.1", protocol=1, address="10.0.0.2",
                           peer_port=7420, dht_port=7421, state="joining", memory_free=1, started_at=0.0, now=1.0)
    assert record["memory_used"] == 0 and record["rss"] is None and record["loop_lag_ms"] is None
    assert record["serving"] == [] and record["rtt_ms"] == {}


def test_status_view_orders_and_hides_leavers() -> None:
    me, other, gone = "c" * 64, "a" * 64, "b" * 64
    members = {
        other: {"name": "beta", "state": "ready", "ts": 90.0},
        gone: {"name": "alpha", "state": "leaving", "ts": 99.0},
        me: {"name": "zeta", "state": "leaving", "ts": 100.0},
    }
    view = status_view(members, self_id=me, cluster_id="c1", now=100.0)
    assert view["self"] == me and view["cluster"] == "c1"
    assert [n["id"] for n in view["nodes"]] == [me, other]  # this node first, even when leaving
    assert view["nodes"][1]["last_seen_s"] == 10.0 and "ts" not in view["nodes"][1]
    assert view["nodes"][0]["self"] and not view["nodes"][1]["self"]


def _good(node_id: str) -> dict[str, object]:
    return member_record(
        {"os": "linux", "platform": "Linux", "arch": "x86_64", "cpu_model": "EPYC", "cpu_count": 2,
         "memory_total": 10, "memory_available": 5, "memory_allowed": 4, "device": "EPYC",
         "device_kind": "cpu", "device_count": 1, "device_memory_total": None,
         "device_memory_available": None, "tflops": 0.2, "tflops_matmul_size": 512, "jax_version": "0.10"},
        node_id=node_id, name="n", version="0.1", protocol=1, address="10.0.0.2", peer_port=7420,
        dht_port=7421, state="ready", memory_free=5, rss=3, started_at=0.0, now=10.0, loop_lag_ms=0.4,
    )


def test_member_problem_accepts_a_real_record_and_names_what_is_wrong() -> None:
    pid = "ab" * 32
    assert member_problem(pid, _good(pid)) is None
    cases = [
        ({"ts": "x"}, "bad_ts"),  # the record that once broke status on every node
        ({"ts": float("nan")}, "bad_ts"),
        ({"id": "cd" * 32}, "wrong_id"),
        ({"name": "\x1b[2J"}, "bad_name"),
        ({"name": "n" * 65}, "bad_name"),
        ({"addresses": []}, "bad_addresses"),
        ({"addresses": ["1.2.3.4"] * 9}, "bad_addresses"),
        ({"state": "hacked"}, "bad_state"),
        ({"peer_port": 0}, "bad_port"),
        ({"memory_free": -1}, "bad_memory_free"),
        ({"tflops": True}, "bad_tflops"),
        ({"clock_offset_s": "soon"}, "bad_clock_offset_s"),
        ({"serving": "all"}, "bad_serving"),
        ({"memory_used": None}, "bad_memory_used"),
        ({"rss": -1}, "bad_rss"),
        ({"rss": 1.5}, "bad_rss"),
        ({"rss": True}, "bad_rss"),
        ({"loop_lag_ms": float("nan")}, "bad_loop_lag_ms"),
        ({"loop_lag_ms": float("inf")}, "bad_loop_lag_ms"),
        ({"loop_lag_ms": -0.1}, "bad_loop_lag_ms"),
        ({"loop_lag_ms": 60_000.1}, "bad_loop_lag_ms"),
        ({"loop_lag_ms": 1e308}, "bad_loop_lag_ms"),
        ({"loop_lag_ms": True}, "bad_loop_lag_ms"),
        ({"loop_lag_ms": "3 ms"}, "bad_loop_lag_ms"),
        ({"rtt_ms": [1.0]}, "bad_rtt_ms"),
        ({"rtt_ms": {"ab": 1.0}}, "bad_rtt_ms"),
        ({"rtt_ms": {"a" * 64: -1}}, "bad_rtt_ms"),
        ({"rtt_ms": {"a" * 64: float("inf")}}, "bad_rtt_ms"),
        ({"rtt_ms": {f"{i:064x}": 1.0 for i in range(33)}}, "bad_rtt_ms"),
        ({"serving": [{"model": "zz", "name": "m", "start": 0, "end": 2, "epoch": 1, "sessions": 0}]},
         "bad_serving"),
        ({"serving": [{"model": "a" * 64, "name": "\x1b[2J", "start": 0, "end": 2, "epoch": 1, "sessions": 0}]},
         "bad_serving"),
        ({"serving": [{"model": "a" * 64, "name": "m", "start": 2, "end": 2, "epoch": 1, "sessions": 0}]},
         "bad_serving"),
        ({"serving": [{"model": "a" * 64, "name": "m", "start": 0, "end": 2, "epoch": 1, "sessions": 0,
                       "memory": -5}]}, "bad_serving"),
        ({"serving": [{"model": "a" * 64, "name": "m", "start": 0, "end": 2, "epoch": 1, "sessions": 0,
                       "memory": "1 GB"}]}, "bad_serving"),
        ({"serving": [{"model": "a" * 64, "name": "m", "start": 0, "end": 2, "epoch": 1, "sessions": 0}] * 17},
         "bad_serving"),
    ]
    for change, reason in cases:
        record = {**_good(pid), **change}
        assert member_problem(pid, record) == reason, change
    assert member_problem(pid, "a string") == "not_a_map"
    for change in ({"loop_lag_ms": 0}, {"loop_lag_ms": 0.0}, {"loop_lag_ms": 60_000}, {"loop_lag_ms": 12.5},
                   {"loop_lag_ms": None}, {"rss": None}, {"rss": 0}):
        assert member_problem(pid, {**_good(pid), **change}) is None, change
    older = {k: v for k, v in _good(pid).items() if k not in ("loop_lag_ms", "rss")}  # a record of an older build
    assert member_problem(pid, older) is None
    # and a valid record always renders
    view = status_view({pid: _good(pid)}, self_id=pid, cluster_id="c", now=20.0)
    assert view["nodes"][0]["last_seen_s"] == 10.0


def test_a_member_a_read_missed_is_kept_for_the_grace_then_dropped() -> None:
    from node.cluster.directory import RecentMembers

    now = [100.0]
    recent = RecentMembers(grace=6.0, limit=3, clock=lambda: now[0])
    a, b = {"name": "a", "state": "ready"}, {"name": "b", "state": "ready"}
    assert recent.merge({"a" * 64: a, "b" * 64: b}) == {"a" * 64: a, "b" * 64: b}
    now[0] = 104.0
    assert set(recent.merge({"a" * 64: a})) == {"a" * 64, "b" * 64}  # b blinked out of one read
    now[0] = 111.0
    assert set(recent.merge({"a" * 64: a})) == {"a" * 64}  # gone for longer than the grace
    leaving = {"name": "a", "state": "leaving"}
    assert recent.merge({"a" * 64: leaving}) == {"a" * 64: leaving}  # said it leaves: not kept
    assert recent.merge({}) == {}
    many = {str(i) * 64: a for i in range(5)}
    assert len(recent.merge(many)) == 5 and len(recent.merge({})) == 3  # bounded
