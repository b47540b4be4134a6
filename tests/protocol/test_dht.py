"""protocol/dht.py: DHT datagrams built and parsed without any I/O; every bad input a named drop."""

from __future__ import annotations

import os

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.dht import (
    ID_LEN,
    DhtRequest,
    DhtResponse,
    Drop,
    build_datagram,
    pack_body,
    parse_datagram,
    parse_node_tuple,
    parse_value_answer,
    receiver_tag,
)
from protocol.ids import dht_id_for
from protocol.seal import ReplayGuard, seal

KEY = os.urandom(32)
PRIVATE = Ed25519PrivateKey.generate()
PUBLIC = PRIVATE.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
SENDER = dht_id_for(PUBLIC)
NOW = 1_700_000_000.0


ME = receiver_tag("10.0.0.1", 7421)


def datagram(message: object, *, now: float = NOW, key: bytes = KEY, to: bytes = ME) -> bytes:
    return build_datagram(pack_body(message), seal_key=key, public_key=PUBLIC, sign=PRIVATE.sign, now=now,  # type: ignore[arg-type]
                          receiver=to)


def parse(data: bytes, replay: ReplayGuard | None = None) -> DhtRequest | DhtResponse | Drop:
    return parse_datagram(data, seal_key=KEY, now=NOW, max_skew=60,
                          replay=replay if replay is not None else ReplayGuard(60), receiver=ME)


def test_requests_and_responses_round_trip() -> None:
    msg_id, key = os.urandom(ID_LEN), os.urandom(ID_LEN)
    assert parse(datagram([0, msg_id, "ping", [SENDER]])) == DhtRequest(msg_id, "ping", SENDER, sent_at=NOW)
    assert parse(datagram([0, msg_id, "find_value", [SENDER, key]])) == DhtRequest(
        msg_id, "find_value", SENDER, key, sent_at=NOW
    )
    cookie = os.urandom(16)
    assert parse(datagram([0, msg_id, "find_value", [SENDER, key, cookie]])) == DhtRequest(
        msg_id, "find_value", SENDER, key, cookie=cookie, sent_at=NOW
    )
    assert parse(datagram([0, msg_id, "store", [SENDER, key, b"rec", 5]])) == DhtRequest(
        msg_id, "store", SENDER, key, b"rec", 5.0, sent_at=NOW
    )
    assert parse(datagram([1, msg_id, [1, 2]])) == DhtResponse(msg_id, SENDER, [1, 2], NOW)


def test_a_datagram_is_bound_to_its_receiver() -> None:
    for_other = datagram([0, os.urandom(ID_LEN), "ping", [SENDER]], to=receiver_tag("10.0.0.2", 7421))
    assert parse(for_other).reason == "bad_seal"  # type: ignore[union-attr]
    same = receiver_tag("::ffff:10.0.0.1", 7421), receiver_tag("fe80::1%eth0", 1), receiver_tag("fe80::1", 1)
    assert same[1] == same[2]  # the scope is not part of the address


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ([0, b"short", "ping", [SENDER]], "malformed"),
        ([0, bytes(ID_LEN), "rm -rf", [SENDER]], "malformed"),
        ([0, bytes(ID_LEN), "ping", [bytes(ID_LEN)]], "id_mismatch"),
        ([0, bytes(ID_LEN), "ping", [SENDER, b"extra"]], "malformed"),
        ([0, bytes(ID_LEN), "find_node", [SENDER, b"short"]], "malformed"),
        ([0, bytes(ID_LEN), "find_value", [SENDER, bytes(ID_LEN), b"short cookie"]], "malformed"),
        ([0, bytes(ID_LEN), "find_node", [SENDER, bytes(ID_LEN), bytes(16)]], "malformed"),
        ([0, bytes(ID_LEN), "store", [SENDER, bytes(ID_LEN), "not bytes", 1]], "malformed"),
        ([0, bytes(ID_LEN), "store", [SENDER, bytes(ID_LEN), b"r", True]], "malformed"),
        ([2, bytes(ID_LEN), "x"], "malformed"),
        ({"not": "a list"}, "malformed"),
    ],
)
def test_bad_shapes_are_named(message: object, reason: str) -> None:
    assert parse(datagram(message)) == Drop(reason)


def test_seal_clock_and_replay_are_checked_first() -> None:
    good = datagram([0, bytes(ID_LEN), "ping", [SENDER]])
    assert parse(datagram([0, bytes(ID_LEN), "ping", [SENDER]], key=os.urandom(32))).reason == "bad_seal"  # type: ignore[union-attr]
    stale = parse(datagram([0, bytes(ID_LEN), "ping", [SENDER]], now=NOW - 3600))
    assert isinstance(stale, Drop) and stale.reason == "stale" and stale.detail
    assert stale.sent_at == NOW - 3600  # the sender's clock, authentic even when stale
    replay = ReplayGuard(60)
    assert isinstance(parse(good, replay), DhtRequest)
    assert parse(good, replay) == Drop("replay")
    not_msgpack = seal(KEY, b"\xc1", now=NOW)
    assert isinstance(parse(not_msgpack), Drop)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=300))
def test_any_signed_body_parses_or_drops(body: bytes) -> None:
    data = build_datagram(body, seal_key=KEY, public_key=PUBLIC, sign=PRIVATE.sign, now=NOW, receiver=ME)
    assert isinstance(parse(data), DhtRequest | DhtResponse | Drop)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_drop(data: bytes) -> None:
    assert isinstance(parse(data), Drop)


def test_node_tuples_and_value_answers() -> None:
    nid = os.urandom(ID_LEN)
    assert parse_node_tuple([nid, "10.0.0.1", 7421]) == (nid, "10.0.0.1", 7421)
    for bad in ([nid, "10.0.0.1", 0], [nid, "10.0.0.1", True], [b"x", "h", 1], [nid, 5, 1], "x", [nid]):
        assert parse_node_tuple(bad) is None
    answer = parse_value_answer({"records": [[b"r", 5], [b"s", "x"], "junk"], "nodes": [[nid, "h", 1]], "truncated": True})
    assert answer.records == [(b"r", 5.0)] and answer.malformed == 2
    assert answer.nodes == [[nid, "h", 1]] and answer.truncated
    assert parse_value_answer([[nid, "h", 1]]).nodes == [[nid, "h", 1]]
    empty = parse_value_answer("garbage")
    assert empty.records == [] and empty.nodes == [] and not empty.truncated
    assert msgpack  # the format is plain msgpack
