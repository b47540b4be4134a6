"""Tests for node.config_render: the commented config file, the example, atomic writes."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import (
    load_config,
    main,
    render_config,
    render_example,
    update_config,
    write_config,
)
from node.config_render import example_values
from node.config_schema import keys, sections

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "node.example.toml"


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    secret = tmp_path / "cluster.secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    return tmp_path


def _lines(text: str) -> list[str]:
    return text.splitlines()


# --- render_config ----------------------------------------------------------------------


def test_render_round_trips_through_tomllib_and_load(cfg_dir: Path) -> None:
    values: dict[str, dict[str, Any]] = {
        "node": {"name": 'we "quote"\\ and ünïcode\n', "data_dir": cfg_dir / "d"},
        "cluster": {"secret_file": "cluster.secret"},
        "network": {"bootstrap": ["192.168.1.2:7421", "[::1]:7421"], "discovery": False},
        "api": {"token_file": None},
        "dht": {"republish_interval": 2.5, "record_ttl": 1e20},
        "swarm": {"piece_size": "1 MiB"},
    }
    text = render_config(values)
    # A value of None is "not set": the key is shown commented out, like any unset key.
    assert "\ntoken_file =" not in text and "\n# token_file = " in text
    assert tomllib.loads(text) == {
        "node": {"name": 'we "quote"\\ and ünïcode\n', "data_dir": str(cfg_dir / "d")},
        "cluster": {"secret_file": "cluster.secret"},
        "network": {"bootstrap": ["192.168.1.2:7421", "[::1]:7421"], "discovery": False},
        "api": {},
        "resources": {},
        "dht": {"republish_interval": 2.5, "record_ttl": 1e20},
        "engine": {},
        "swarm": {"piece_size": "1 MiB"},
        "log": {},
    }
    path = cfg_dir / "rendered.toml"
    write_config(path, text)
    config = load_config(path)
    assert config.node.name == 'we "quote"\\ and ünïcode'
    assert config.node.data_dir == cfg_dir / "d"
    assert config.network.bootstrap == (("192.168.1.2", 7421), ("::1", 7421))
    assert config.network.discovery is False
    assert config.dht.record_ttl == 1e20
    assert config.swarm.piece_size == 1024**2


def test_render_lists_every_section_and_key_with_its_doc() -> None:
    text = render_config({})
    lines = _lines(text)
    for section, cls in sections().items():
        header = lines.index(f"[{section}]")
        assert lines[header + 1] == f"# {cls.__doc__}"
        for name, spec in keys(cls).items():
            # The key's line comes right after its doc comment (wrapped to 80 columns).
            at = next(
                i for i in range(header, len(lines)) if lines[i].startswith(f"# {name} = ")
            )
            doc_words = " ".join(line[2:] for line in lines[header:at] if line.startswith("# "))
            assert " ".join(spec.doc.split()) in doc_words
    comments = [line for line in lines if line.startswith("#") and " = " not in line]
    assert max(len(line) for line in comments) <= 80
    # Nothing is set: every key is commented out, so the file is all empty tables.
    assert tomllib.loads(text) == {section: {} for section in sections()}


def test_unset_keys_show_their_default() -> None:
    text = render_config({"network": {"peer_port": 9000}})
    assert "\npeer_port = 9000\n" in text
    assert "\n# dht_port = 7421\n" in text
    assert '\n# piece_size = "4MiB"\n' in text  # as a person writes it, not 4194304
    assert '\n# name = "workstation-1"\n' in text  # no fixed default: an example


def test_multiline_values_are_commented_line_by_line() -> None:
    text = render_config({"network": {"bootstrap": ["10.0.0.1:7421", "10.0.0.2:7421"]}})
    assert tomllib.loads(text)["network"]["bootstrap"] == ["10.0.0.1:7421", "10.0.0.2:7421"]
    shown = render_config({})
    assert "\n# bootstrap = []\n" in shown


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"nope": {}}, "unknown config section 'nope'"),
        ({"dht": {"refresh_interval": 1}}, "unknown config key dht.refresh_interval"),
        ({"node": {"name": {"a": 1}}}, r"node\.name: cannot write a table"),
        ({"network": {"bootstrap": [{"a": 1}]}}, r"network\.bootstrap: cannot write a table"),
        ({"node": {"name": object()}}, r"node\.name: cannot write object"),
        ({"node": "x"}, "must be a dict"),
    ],
)
def test_render_refuses_what_the_schema_cannot_hold(values: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        render_config(values)


_scalars = (
    st.text(max_size=20)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
_section_values = st.fixed_dictionaries(
    {},
    optional={
        section: st.fixed_dictionaries(
            {}, optional={name: _scalars | st.lists(_scalars, max_size=4) for name in keys(cls)}
        )
        for section, cls in sections().items()
    },
)


@settings(deadline=None)  # behaviour, not speed: a loaded CI machine must not fail it
@given(_section_values)
def test_render_config_is_valid_toml(values: dict[str, dict[str, object]]) -> None:
    parsed = tomllib.loads(render_config(values))
    assert parsed == {section: values.get(section, {}) for section in sections()}


# --- writing ----------------------------------------------------------------------------


def test_write_config_is_atomic_and_creates_parents(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "node.toml"
    write_config(path, "[node]\nname = 'one'\n")
    write_config(path, "[node]\nname = 'two'\n")
    assert path.read_text() == "[node]\nname = 'two'\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.toml"]  # no temp files left
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o644


def test_update_config_sets_keys_and_keeps_the_rest(cfg_dir: Path) -> None:
    path = cfg_dir / "node.toml"
    write_config(path, render_config({"cluster": {"secret_file": "cluster.secret"},
                                      "network": {"peer_port": 0}}))
    update_config(path, {"dht": {"republish_interval": 1.0, "record_ttl": 6.0}})
    document = tomllib.loads(path.read_text())
    assert document["network"] == {"peer_port": 0}
    assert document["dht"] == {"republish_interval": 1.0, "record_ttl": 6.0}
    config = load_config(path)
    assert (config.dht.republish_interval, config.network.peer_port) == (1.0, 0)
    assert "# Seconds between re-publishing" in path.read_text()  # still self-explaining


# --- the shipped example ----------------------------------------------------------------


def test_committed_example_is_what_the_renderer_writes() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == render_example(), (
        "configs/node.example.toml is out of date; regenerate it with "
        "`python -m node.config --example > configs/node.example.toml`"
    )


def test_example_command_prints_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--example"]) == 0
    assert capsys.readouterr().out == render_example()
    assert main([]) == 2


def test_example_documents_every_key_and_sets_only_fixed_defaults() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    document = tomllib.loads(text)
    for section, cls in sections().items():
        assert f"\n[{section}]\n" in text, section
        for name, spec in keys(cls).items():
            assert f"\n{name} = " in text or f"\n# {name} = " in text, f"{section}.{name}"
            assert " ".join(spec.doc.split()[:6]) in " ".join(text.replace("# ", " ").split())
    assert document["cluster"] == {"secret_file": "cluster.secret", "allow": [], "deny": []}
    assert document == example_values()
    for absent in ("name", "data_dir", "key_file"):
        assert absent not in document["node"]  # machine-dependent: shown commented out


def test_example_loads_as_a_real_config(tmp_path: Path) -> None:
    document = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    # Point the secret at a temp file so the example loads as a real config.
    secret = tmp_path / "cluster.secret"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    document["cluster"]["secret_file"] = str(secret)
    document["node"]["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "node.toml"
    write_config(path, render_config(document))
    config = load_config(path)
    assert config.cluster.secret_file == secret
    assert config.network.peer_port == 7420
