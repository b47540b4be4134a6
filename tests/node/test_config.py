"""Tests for node.config: loading, validation messages, defaults, and the schema."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from node.config import (
    DEFAULT_API_HOST,
    DEFAULT_API_PORT,
    DEFAULT_BEACON_GROUP,
    DEFAULT_BEACON_PORT,
    DEFAULT_DHT_PORT,
    DEFAULT_LISTEN,
    DEFAULT_PEER_PORT,
    LOG_LEVELS,
    Config,
    ConfigError,
    default_config_path,
    default_data_dir,
    load_config,
)
from node.config_schema import Key, keys, sections
from node.config_values import Ctx
from node.system.logs import LEVELS

needs_posix_perms = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes only")


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    secret = tmp_path / "cluster.secret"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    return tmp_path


def write(cfg_dir: Path, body: str, *, with_cluster: bool = True) -> Path:
    # The [cluster] table goes last so that bodies may start with top-level keys.
    text = body + ('\n[cluster]\nsecret_file = "cluster.secret"\n' if with_cluster else "")
    path = cfg_dir / "node.toml"
    path.write_text(text)
    return path


def load(cfg_dir: Path, body: str = "", **kw: bool) -> Config:
    return load_config(write(cfg_dir, body, **kw))


def error(cfg_dir: Path, body: str, **kw: bool) -> str:
    with pytest.raises(ConfigError) as info:
        load(cfg_dir, body, **kw)
    return str(info.value)


# --- defaults and types -----------------------------------------------------------------


def test_minimal_config_gets_documented_defaults(
    cfg_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(cfg_dir / "xdg-data"))
    config = load(cfg_dir)
    assert config.path == cfg_dir / "node.toml"
    assert config.node.name
    assert config.node.data_dir == cfg_dir / "xdg-data" / "enjambre"
    assert config.node.key_file == config.node.data_dir / "node.key"
    assert config.cluster.secret_file == cfg_dir / "cluster.secret"
    net = config.network
    assert (net.listen, net.peer_port, net.dht_port) == ("127.0.0.1", 7420, 7421)
    assert net.bootstrap == ()
    assert net.discovery is True and net.allow_public is False
    assert (net.beacon_group, net.beacon_port, net.beacon_interval) == ("239.255.74.20", 7423, 5.0)
    assert (config.api.host, config.api.port, config.api.token_file) == ("127.0.0.1", 7422, None)
    assert config.api.is_loopback
    assert config.resources.max_memory is None
    assert (config.dht.republish_interval, config.dht.record_ttl) == (10.0, 30.0)
    assert (config.dht.ksize, config.dht.alpha) == (20, 3)
    assert (config.engine.max_context, config.engine.compute_dtype) == (4096, "auto")
    assert config.swarm.piece_size == 4 * 1024 * 1024
    assert (config.swarm.max_upload_rate, config.swarm.max_download_rate) == (0, 0)
    assert (config.log.level, config.log.format) == ("info", "auto")


def test_full_config_typed_values(cfg_dir: Path) -> None:
    (cfg_dir / "tok").write_text("t0ken")
    (cfg_dir / "tok").chmod(0o600)
    config = load(
        cfg_dir,
        """
[node]
name = "box-1"
data_dir = "state"
key_file = "keys/me.key"
[network]
listen = "192.168.1.20"
peer_port = 0
dht_port = 9000
bootstrap = ["192.168.1.21:7421", "[fe80::1%eth0]:7421", "nodeb.local:7421"]
discovery = false
beacon_interval = 1
[api]
host = "0.0.0.0"
port = 8080
token_file = "tok"
[resources]
max_memory = "6 GiB"
[dht]
republish_interval = 2
record_ttl = 5.5
[engine]
compute_dtype = "BFloat16"
max_context = 1024
[swarm]
piece_size = "1MiB"
max_upload_rate = "10 MB"
max_download_rate = 1000
[log]
level = "DEBUG"
format = "json"
""",
    )
    assert config.node.data_dir == cfg_dir / "state"
    assert config.node.key_file == cfg_dir / "keys" / "me.key"
    assert config.network.peer_port == 0
    assert config.network.bootstrap == (
        ("192.168.1.21", 7421),
        ("fe80::1%eth0", 7421),
        ("nodeb.local", 7421),
    )
    assert config.network.beacon_interval == 1.0
    assert isinstance(config.network.beacon_interval, float)
    assert config.api.token_file == cfg_dir / "tok"
    assert not config.api.is_loopback
    assert config.resources.max_memory == 6 * 1024**3
    assert config.engine.compute_dtype == "bfloat16"
    assert config.swarm.piece_size == 1024**2
    assert config.swarm.max_upload_rate == 10_000_000
    assert config.log.level == "debug"


def test_config_is_frozen(cfg_dir: Path) -> None:
    config = load(cfg_dir)
    with pytest.raises(AttributeError):
        config.network.peer_port = 1  # type: ignore[misc]


def test_absolute_and_home_paths(cfg_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(cfg_dir / "home"))
    config = load(cfg_dir, f'[node]\ndata_dir = "~/d"\nkey_file = "{cfg_dir}/abs.key"\n')
    assert config.node.data_dir == cfg_dir / "home" / "d"
    assert config.node.key_file == cfg_dir / "abs.key"


def test_relative_paths_resolve_against_config_dir_not_cwd(
    cfg_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load(cfg_dir, '[node]\ndata_dir = "data"\n')
    assert config.node.data_dir == cfg_dir / "data"


# --- errors a user can cause ------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found.*nodectl init"):
        load_config(tmp_path / "nope.toml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_invalid_toml_names_line(cfg_dir: Path) -> None:
    message = error(cfg_dir, "[network]\npeer_port = 7420\nlisten = \n")
    assert str(cfg_dir / "node.toml") in message
    assert "invalid TOML" in message and "line 3" in message


def test_not_utf8(cfg_dir: Path) -> None:
    path = cfg_dir / "node.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("[network]\npeer_prot = 1\n", "network.peer_prot", "did you mean 'peer_port'"),
        ("[network]\nlisten_addr = '10.0.0.1'\n", "network.listen_addr", "did you mean 'listen'"),
        ("[node]\npeer_port = 1\n", "node.peer_port", "belongs in the [network] section"),
        ("[netwrok]\n", "netwrok", "did you mean 'network'"),
        ("peer_port = 7420\n", "peer_port", "belongs in the [network] section"),
        ("[node]\nfoo = 1\n", "node.foo", "keys in [node]: name, data_dir, key_file"),
        ("network = 3\n", "network", "must be a table"),
    ],
)
def test_unknown_keys_suggest(cfg_dir: Path, body: str, key: str, fragment: str) -> None:
    message = error(cfg_dir, body)
    assert f": {key}: " in message
    assert fragment in message


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("[network]\npeer_port = '7420'\n", "network.peer_port", "must be an integer, got str"),
        ("[network]\npeer_port = true\n", "network.peer_port", "must be an integer, got bool"),
        ("[network]\npeer_port = 7420.0\n", "network.peer_port", "must be an integer"),
        ("[network]\ndiscovery = 'yes'\n", "network.discovery", "must be true or false"),
        ("[network]\nbootstrap = '10.0.0.1:7421'\n", "network.bootstrap", "must be a list"),
        ("[network]\nbootstrap = [7421]\n", "network.bootstrap", "entry 0 must be a 'HOST:PORT'"),
        ("[node]\nname = 5\n", "node.name", "must be a string"),
        ("[node]\nname = '   '\n", "node.name", "must not be empty"),
        ('[node]\nname = "a\\tb"\n', "node.name", "printable characters"),
        ("[node]\ndata_dir = ''\n", "node.data_dir", "empty string"),
        ("[dht]\nrecord_ttl = 'long'\n", "dht.record_ttl", "must be a number"),
        ("[dht]\nrecord_ttl = nan\n", "dht.record_ttl", "finite"),
        ("[network]\nbeacon_interval = 0\n", "network.beacon_interval", "positive"),
        ("[dht]\nksize = 0\n", "dht.ksize", "1-256"),
        ("[engine]\nmax_context = 0\n", "engine.max_context", ">= 1"),
        ("[engine]\ncompute_dtype = 'fp8'\n", "engine.compute_dtype", "auto, float32, bfloat16"),
        ("[log]\nlevel = 'loud'\n", "log.level", "debug, info, warning, error"),
        ("[log]\nformat = 'xml'\n", "log.format", "auto, json, console"),
        ("[resources]\nmax_memory = '8G'\n", "resources.max_memory", "ambiguous"),
        ("[resources]\nmax_memory = -1\n", "resources.max_memory", "negative"),
        ("[resources]\nmax_memory = 0\n", "resources.max_memory", "at least 1 B"),
        (
            "[swarm]\npiece_size = '1KiB'\n",
            "swarm.piece_size",
            "at least 16 KiB and at most 64 MiB",
        ),
        ("[swarm]\nmax_upload_rate = 'fast'\n", "swarm.max_upload_rate", "cannot read"),
    ],
)
def test_wrong_types_and_values(cfg_dir: Path, body: str, key: str, fragment: str) -> None:
    message = error(cfg_dir, body)
    assert f"node.toml: {key}: " in message
    assert fragment in message


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("[network]\npeer_port = 65536\n", "network.peer_port", "0 to let the OS pick"),
        ("[network]\ndht_port = -1\n", "network.dht_port", "out of range"),
        ("[api]\nport = 70000\n", "api.port", "1-65535"),
        ("[network]\nbeacon_port = 0\n", "network.beacon_port", "allowed: 1-65535"),
    ],
)
def test_port_ranges(cfg_dir: Path, body: str, key: str, fragment: str) -> None:
    message = error(cfg_dir, body)
    assert f": {key}: " in message and fragment in message


def test_port_zero_means_ephemeral(cfg_dir: Path) -> None:
    config = load(cfg_dir, "[network]\npeer_port = 0\ndht_port = 0\n[api]\nport = 0\n")
    assert (config.network.peer_port, config.network.dht_port, config.api.port) == (0, 0, 0)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("10.0.0.1", "has no port"),
        ("10.0.0.1:", "port '' is not a number"),
        ("10.0.0.1:abc", "is not a number"),
        ("10.0.0.1:0", "out of range 1-65535"),
        ("10.0.0.1:99999", "out of range"),
        ("fe80::1:7421", "has no port"),
        ("[fe80::1:7421", "missing ']'"),
        ("[nothost]:7421", "not an IPv6 address"),
        ("bad_host!:7421", "neither an IP address nor a valid host name"),
        ("host\\n:7421", "neither an IP address nor a valid host name"),
    ],
)
def test_bad_bootstrap_entries(cfg_dir: Path, entry: str, fragment: str) -> None:
    message = error(cfg_dir, f'[network]\nbootstrap = ["192.168.0.9:7421", "{entry}"]\n')
    assert ": network.bootstrap: entry 1: " in message
    assert fragment in message


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ("[network]\nlisten = '0.0.0.0'\n", "network.listen", "cannot be advertised"),
        ("[network]\nlisten = 'myhost'\n", "network.listen", "not an IP address"),
        ("[network]\nlisten = '8.8.8.8'\n", "network.listen", "allow_public = true"),
        ("[network]\nbootstrap = ['1.1.1.1:7421']\n", "network.bootstrap", "public address"),
        # Python calls documentation ranges "private"; the LAN policy does not.
        ("[network]\nlisten = '203.0.113.5'\n", "network.listen", "public address"),
        ("[network]\nbeacon_group = '10.0.0.1'\n", "network.beacon_group", "not a multicast"),
        ("[network]\nbeacon_group = 'x'\n", "network.beacon_group", "not an IP address"),
        ("[api]\nhost = 'bad host'\n", "api.host", "neither an IP address"),
        ("[api]\nhost = '[::1]'\n", "api.host", "without brackets"),
        ("[api]\nhost = '0.0.0.0'\n", "api.token_file", "needs a bearer token"),
        ("[api]\nport = 7420\n", "api.port", "both 7420"),
        ("[network]\ndht_port = 7420\n", "network.dht_port", "both 7420"),
        (
            "[dht]\nrepublish_interval = 30\n",
            "dht.record_ttl",
            "longer than dht.republish_interval",
        ),
        ("[dht]\nksize = 2\nalpha = 3\n", "dht.alpha", "must not exceed dht.ksize"),
    ],
)
def test_cross_field_rules(cfg_dir: Path, body: str, key: str, fragment: str) -> None:
    message = error(cfg_dir, body)
    assert f": {key}: " in message and fragment in message


def test_public_addresses_allowed_when_opted_in(cfg_dir: Path) -> None:
    config = load(
        cfg_dir,
        "[network]\nallow_public = true\nlisten = '8.8.8.8'\nbootstrap = ['1.1.1.1:7421']\n",
    )
    assert config.network.listen == "8.8.8.8"


def test_missing_secret_file_key(cfg_dir: Path) -> None:
    message = error(cfg_dir, "[node]\nname = 'x'\n", with_cluster=False)
    assert ": cluster.secret_file: is required" in message
    assert "nodectl init --new-cluster" in message
    assert "nodectl init --secret-file" in message and "nodectl secret" in message


def test_secret_file_does_not_exist(cfg_dir: Path) -> None:
    (cfg_dir / "cluster.secret").unlink()
    message = error(cfg_dir, "")
    assert ": cluster.secret_file: " in message
    assert str(cfg_dir / "cluster.secret") in message
    assert "nodectl init --new-cluster" in message
    assert "nodectl init --secret-file" in message and "nodectl secret" in message


@needs_posix_perms
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_file_permissions(cfg_dir: Path, mode: int) -> None:
    secret = cfg_dir / "cluster.secret"
    secret.chmod(mode)
    message = error(cfg_dir, "")
    assert ": cluster.secret_file: " in message
    assert f"chmod 600 {secret}" in message and f"{mode:04o}" in message


def test_secret_file_empty(cfg_dir: Path) -> None:
    (cfg_dir / "cluster.secret").write_text("")
    assert "is empty" in error(cfg_dir, "")


def test_secret_file_is_directory(cfg_dir: Path) -> None:
    (cfg_dir / "dir.secret").mkdir()
    message = error(cfg_dir, '[cluster]\nsecret_file = "dir.secret"\n', with_cluster=False)
    assert "not a regular file" in message


@needs_posix_perms
def test_key_file_permissions_checked_only_when_present(cfg_dir: Path) -> None:
    body = '[node]\nkey_file = "node.key"\n'
    assert load(cfg_dir, body).node.key_file == cfg_dir / "node.key"  # absent: fine
    key = cfg_dir / "node.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    message = error(cfg_dir, body)
    assert ": node.key_file: " in message and f"chmod 600 {key}" in message
    key.chmod(0o600)
    assert load(cfg_dir, body).node.key_file == key


def test_token_file_missing_and_permissions(cfg_dir: Path) -> None:
    body = "[api]\nhost = '0.0.0.0'\ntoken_file = 'api.token'\n"
    message = error(cfg_dir, body)
    assert ": api.token_file: " in message and "does not exist" in message
    token = cfg_dir / "api.token"
    token.write_text("abc")
    token.chmod(0o640)
    if os.name == "posix":
        assert "chmod 600" in error(cfg_dir, body)
    token.chmod(0o600)
    assert load(cfg_dir, body).api.token_file == token


def test_renamed_key_names_the_new_one(cfg_dir: Path) -> None:
    message = error(cfg_dir, "[dht]\nrefresh_interval = 2\n")
    assert ": dht.refresh_interval: " in message
    assert "now called dht.republish_interval" in message
    assert "`republish_interval = ...` under [dht]" in message
    # Also when the new key is there too: the old one must go.
    assert "now called" in error(cfg_dir, "[dht]\nrepublish_interval = 2\nrefresh_interval = 2\n")
    assert load(cfg_dir, "[dht]\nrepublish_interval = 2\n").dht.republish_interval == 2.0


# --- the schema itself ------------------------------------------------------------------

_ALL_KEYS = [(s, k, spec) for s, cls in sections().items() for k, spec in keys(cls).items()]


def test_sections_are_the_config_fields() -> None:
    assert list(sections()) == [
        "node", "cluster", "network", "api", "resources", "dht", "engine", "swarm", "log",
    ]
    for name, cls in sections().items():
        assert dataclasses.fields(Config)[list(sections()).index(name)].name == name
        assert cls.__doc__, f"[{name}] needs a docstring: it heads the section in the file"


@pytest.mark.parametrize(("section", "name", "spec"), _ALL_KEYS, ids=[f"{s}.{k}" for s, k, _ in _ALL_KEYS])
def test_every_key_is_documented_and_its_shown_value_is_valid(
    tmp_path: Path, section: str, name: str, spec: Key
) -> None:
    assert spec.doc.strip()
    assert spec.shown is not None, "the written file needs a default or an example to show"
    # A default or example the loader would refuse would teach people a broken file.
    spec.convert(spec.shown, Ctx(path=tmp_path / "node.toml", base=tmp_path))
    kinds = [spec.default is not None, spec.computed is not None, spec.required]
    assert sum(kinds) <= 1, "a key has one kind of default"


def test_exported_defaults_are_the_schema_defaults(cfg_dir: Path) -> None:
    loaded = load(cfg_dir)
    net, api = loaded.network, loaded.api
    assert (net.listen, net.peer_port, net.dht_port) == (
        DEFAULT_LISTEN,
        DEFAULT_PEER_PORT,
        DEFAULT_DHT_PORT,
    )
    assert (net.beacon_group, net.beacon_port) == (DEFAULT_BEACON_GROUP, DEFAULT_BEACON_PORT)
    assert (api.host, api.port) == (DEFAULT_API_HOST, DEFAULT_API_PORT)
    assert tuple(LEVELS) == LOG_LEVELS


# --- default locations ------------------------------------------------------------------


def test_default_config_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENJAMBRE_CONFIG", str(tmp_path / "x.toml"))
    assert default_config_path() == tmp_path / "x.toml"
    monkeypatch.delenv("ENJAMBRE_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_config_path() == tmp_path / "cfg" / "enjambre" / "node.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_config_path() == tmp_path / "home" / ".config" / "enjambre" / "node.toml"


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/enjambre:/var/lib/other")
    assert default_data_dir() == Path("/var/lib/enjambre")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_data_dir() == tmp_path / "data" / "enjambre"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "enjambre"


