"""Three real daemons on three namespace hosts find each other with no bootstrap configured.

Each host runs `nodectl serve` with its own address on a bridge; the only way
to meet is the sealed multicast beacon. `nodectl status` inside each host must
list all three. Skipped unless root with a working `ip netns`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.config import update_config
from node.testing.netns import Host, bridged_hosts, netns_unusable_reason

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
N = 3


def _nodectl(host: Host, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.command(sys.executable, "-m", "node.cli", *args), capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def _status(host: Host, config: Path, env: dict[str, str]) -> set[str]:
    out = _nodectl(host, "status", "--json", "--config", str(config), env=env)
    if out.returncode != 0:
        return set()
    return {n["id"] for n in json.loads(out.stdout)["nodes"]}


def test_daemons_discover_each_other_by_beacon(tmp_path: Path) -> None:
    reason = netns_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENJAMBRE_BENCH_SECONDS": "0.2",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs: list[subprocess.Popen[bytes]] = []
    with bridged_hosts(N, "10.78.0", "s") as hosts:
        try:
            configs = []
            for i, host in enumerate(hosts):
                cfg = tmp_path / f"n{i}" / "node.toml"
                secret = ["--new-cluster"] if i == 0 else ["--secret-file", str(tmp_path / "secret.txt")]
                out = _nodectl(host, "init", "--config", str(cfg), "--data-dir", str(tmp_path / f"n{i}" / "data"),
                               "--name", f"host{i}", "--listen", host.address, *secret, env=env)
                assert out.returncode == 0, out.stderr
                if i == 0:
                    text = _nodectl(host, "secret", "--config", str(cfg), env=env).stdout
                    (tmp_path / "secret.txt").write_text(text)
                update_config(cfg, {"dht": {"republish_interval": 1.0, "record_ttl": 6.0},
                                    "network": {"beacon_interval": 0.5}})
                configs.append(cfg)
            for host, cfg in zip(hosts, configs, strict=True):
                log = (cfg.parent / "daemon.log").open("wb")
                procs.append(subprocess.Popen(host.command(sys.executable, "-m", "node.cli", "serve", "--config",
                                                           str(cfg)), stdout=log, stderr=subprocess.STDOUT,
                                              env=env, cwd=ROOT))
            ids: set[str] = set()
            views: list[set[str]] = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                views = [_status(h, c, env) for h, c in zip(hosts, configs, strict=True)]
                ids = set().union(*views)
                if len(ids) == N and all(v == ids for v in views):
                    break
                time.sleep(1)
            logs = "\n".join((c.parent / "daemon.log").read_text(errors="replace")[-2000:] for c in configs)
            assert len(ids) == N and all(v == ids for v in views), f"views: {views}\n{logs}"
            addresses = json.loads(_nodectl(hosts[0], "status", "--json", "--config", str(configs[0]),
                                            env=env).stdout)["nodes"]
            assert sorted(n["addresses"][0] for n in addresses) == sorted(h.address for h in hosts)
            # And the encrypted stream works across the bridge.
            peer = next(n for n in addresses if n["addresses"][0] == hosts[1].address)
            ping = _nodectl(hosts[0], "ping", peer["id"][:12], "--config", str(configs[0]), env=env)
            assert ping.returncode == 0, ping.stderr
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
