"""protocol/handshake.py: the Hello decision, table-driven."""

from __future__ import annotations

import pytest

from protocol.handshake import check_hello
from protocol.messages import Hello

PEER, ME = "a" * 64, "b" * 64


@pytest.mark.parametrize(
    ("hello", "expected", "code"),
    [
        (Hello(1, PEER, "n", "v"), None, None),
        (Hello(1, PEER, "n", "v"), PEER, None),
        (Hello(2, PEER, "n", "v"), None, "protocol_version"),
        (Hello(2, "c" * 64, "n", "v"), None, "protocol_version"),  # the version is reported first
        (Hello(1, "c" * 64, "n", "v"), None, "identity_mismatch"),
        (Hello(1, PEER, "n", "v"), "d" * 64, "wrong_node"),
    ],
)
def test_decisions(hello: Hello, expected: str | None, code: str | None) -> None:
    rejection = check_hello(hello, certified_id=PEER, own_id=ME, expected_id=expected, version=1)
    assert (rejection.code if rejection else None) == code


def test_texts_say_what_to_do() -> None:
    version = check_hello(Hello(2, PEER, "n", "v"), certified_id=PEER, own_id=ME, expected_id=None, version=1)
    assert version is not None and version.version_mismatch
    assert "version 1" in version.message and "version 2" in version.message and "same enjambre release" in version.message
    itself = check_hello(Hello(1, ME, "n", "v"), certified_id=ME, own_id=ME, expected_id=None, version=1)
    assert itself is not None and itself.code == "self_connection" and "itself" in itself.detail
    wrong = check_hello(Hello(1, PEER, "n", "v"), certified_id=PEER, own_id=ME, expected_id="d" * 64, version=1)
    assert wrong is not None and "not the expected dddddddddddd" in wrong.detail
