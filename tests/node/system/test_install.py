"""Tests for node.service and the shipped service files."""

from __future__ import annotations

import io
import os
import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from node.cli import main as nodectl
from node.system import install as service
from node.system.install import InstallError, install, render_launchd, render_systemd

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "configs" / "enjambre.service"
PLIST = REPO / "configs" / "com.enjambre.node.plist"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


@pytest.fixture
def fake_nodectl(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "nodectl"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def verify(unit: Path) -> str:
    """Run systemd-analyze verify; return its complaints about ``unit`` ('' = clean)."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # It may also grumble about unrelated units of the host; keep only ours.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line]
    if result.returncode != 0:
        ours.append(f"exit status {result.returncode}")
    return "\n".join(ours)


def install_systemd(tmp_path: Path, nodectl: Path, **kw: object) -> service.InstallResult:
    out = io.StringIO()
    result = install(
        "systemd",
        nodectl_path=nodectl,
        dest_root=tmp_path / "root",
        out=out,
        **kw,  # type: ignore[arg-type]
    )
    return result


# --- the shipped files ------------------------------------------------------------------


def test_unit_template_has_required_settings() -> None:
    text = UNIT.read_text()
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/nodectl serve --config /etc/enjambre/node.toml",
        "Environment=ENJAMBRE_CONFIG=/etc/enjambre/node.toml",
        "Restart=on-failure",
        "StateDirectory=enjambre",
        "ConfigurationDirectory=enjambre",
        "User=enjambre",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "LockPersonality=yes",
        "WantedBy=multi-user.target",
    ]:
        assert f"\n{line}\n" in text, line
    assert "\nRestartSec=" in text and "\nTimeoutStopSec=" in text
    assert "\nPrivateDevices=" not in text  # would hide GPUs
    assert "\nMemoryDenyWriteExecute=" not in text  # XLA JIT needs it


@needs_systemd_analyze
def test_installed_unit_passes_systemd_analyze(tmp_path: Path, fake_nodectl: Path) -> None:
    result = install_systemd(tmp_path, fake_nodectl, config_path=tmp_path / "node.toml")
    assert verify(result.path) == ""


@needs_systemd_analyze
def test_systemd_analyze_check_can_fail(tmp_path: Path, fake_nodectl: Path) -> None:
    # Guards the test above: a typo in the unit must show up as a complaint.
    broken = tmp_path / "enjambre.service"
    text = UNIT.read_text().replace("/usr/local/bin/nodectl", str(fake_nodectl))
    broken.write_text(text.replace("Restart=on-failure", "Restart=sometimes"))
    assert "Restart" in verify(broken) or "restart" in verify(broken)
    missing = tmp_path / "x" / "enjambre.service"
    missing.parent.mkdir()
    missing.write_text(UNIT.read_text().replace("/usr/local/bin/nodectl", "/nonexistent/nodectl"))
    assert verify(missing) != ""


def test_plist_template_parses_with_required_keys() -> None:
    plist = plistlib.loads(PLIST.read_bytes())
    assert plist["Label"] == "com.enjambre.node"
    assert plist["ProgramArguments"][1:3] == ["serve", "--config"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardOutPath"] and plist["StandardErrorPath"]
    assert "ENJAMBRE_CONFIG" in plist["EnvironmentVariables"]


# --- install ----------------------------------------------------------------------------


def test_install_systemd_substitutes_paths(
    tmp_path: Path, fake_nodectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_user_exists", lambda name: False)
    out = io.StringIO()
    config = tmp_path / "etc" / "node.toml"
    result = install(
        "systemd",
        nodectl_path=fake_nodectl,
        config_path=config,
        dest_root=tmp_path / "root",
        user="svc_user",
        out=out,
    )
    assert result.path == tmp_path / "root" / "etc" / "systemd" / "system" / "enjambre.service"
    assert result.written and not result.user_created
    text = result.path.read_text()
    assert text == result.content
    assert f"\nExecStart={fake_nodectl} serve --config {config}\n" in text
    assert f"\nEnvironment=ENJAMBRE_CONFIG={config}\n" in text
    assert "\nUser=svc_user\n" in text and "\nGroup=svc_user\n" in text
    assert "/usr/local/bin/nodectl" not in text.split("[Service]")[1]
    assert result.path.stat().st_mode & 0o777 == 0o644
    printed = out.getvalue()
    assert "systemctl daemon-reload && sudo systemctl enable --now enjambre" in printed
    assert "skipping: create system user 'svc_user'" in printed
    assert f"{fake_nodectl} init --config {config}" in printed  # config does not exist yet


def test_install_systemd_quotes_paths_with_spaces_and_percent(
    tmp_path: Path, fake_nodectl: Path
) -> None:
    spaced = tmp_path / "my tools" / "nodectl"
    spaced.parent.mkdir()
    shutil.copy2(fake_nodectl, spaced)
    config = tmp_path / "conf 100%" / "node.toml"
    result = install_systemd(tmp_path, spaced, config_path=config)
    escaped_config = str(config).replace("%", "%%")
    assert f'ExecStart="{spaced}" serve --config "{escaped_config}"' in result.content
    assert f'Environment="ENJAMBRE_CONFIG={escaped_config}"' in result.content
    if SYSTEMD_ANALYZE is not None:
        assert verify(result.path) == ""


def test_install_systemd_relaxes_protect_home_and_allows_data_dir(
    tmp_path: Path, fake_nodectl: Path
) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\ndata_dir = "/home/alice/enjambre-data"\n')
    out = io.StringIO()
    result = install(
        "systemd", nodectl_path=fake_nodectl, config_path=config, dest_root=tmp_path / "r", out=out
    )
    assert "\nProtectHome=read-only\n" in result.content
    assert "\nReadWritePaths=/home/alice/enjambre-data\n" in result.content
    assert (
        "chown -R" in out.getvalue()
        and f"chown -R enjambre:enjambre {tmp_path}" not in out.getvalue()
    )
    if SYSTEMD_ANALYZE is not None:
        assert verify(result.path) == ""


def test_install_systemd_default_keeps_protect_home(tmp_path: Path, fake_nodectl: Path) -> None:
    result = install_systemd(tmp_path, fake_nodectl)
    assert "\nProtectHome=yes\n" in result.content
    assert "ReadWritePaths" not in result.content
    assert "--config /etc/enjambre/node.toml" in result.content


def test_dry_run_writes_nothing(
    tmp_path: Path, fake_nodectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "_user_exists", lambda name: False)
    monkeypatch.setattr(service, "_create_user", lambda name: pytest.fail("created a user"))
    out = io.StringIO()
    result = install("systemd", nodectl_path=fake_nodectl, dry_run=True, out=out)
    assert not result.written and not result.user_created
    assert result.path == Path("/etc/systemd/system/enjambre.service")
    printed = out.getvalue()
    assert "would run: useradd --system" in printed
    assert f"would write {result.path}" in printed and "Type=notify" in printed
    root = tmp_path / "root"
    install("systemd", nodectl_path=fake_nodectl, dry_run=True, dest_root=root, out=io.StringIO())
    assert not root.exists()


def test_install_creates_missing_user(
    tmp_path: Path, fake_nodectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[str] = []
    monkeypatch.setattr(service, "_user_exists", lambda name: False)
    monkeypatch.setattr(service, "_create_user", created.append)
    monkeypatch.setattr(service, "SYSTEMD_DIR", tmp_path / "systemd")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    result = install("systemd", nodectl_path=fake_nodectl, out=io.StringIO())
    assert created == ["enjambre"] and result.user_created
    assert (tmp_path / "systemd" / "enjambre.service").is_file()


def test_useradd_command_is_a_system_user() -> None:
    command = service._useradd_command("enjambre")
    assert command[0] == "useradd" and "--system" in command and command[-1] == "enjambre"
    assert "--no-create-home" in command


def test_install_launchd_substitutes_paths(
    tmp_path: Path, fake_nodectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "Users" / "alice"
    monkeypatch.setenv("HOME", str(home))
    config = home / ".config" / "enjambre" / "node.toml"
    root = tmp_path / "root"
    out = io.StringIO()
    result = install(
        "launchd", nodectl_path=fake_nodectl, config_path=config, dest_root=root, out=out
    )
    agent = root / home.relative_to("/") / "Library" / "LaunchAgents" / "com.enjambre.node.plist"
    assert result.path == agent
    plist = plistlib.loads(agent.read_bytes())
    assert plist["ProgramArguments"] == [str(fake_nodectl), "serve", "--config", str(config)]
    assert plist["EnvironmentVariables"]["ENJAMBRE_CONFIG"] == str(config)
    log = home / "Library" / "Logs" / "enjambre" / "node.log"
    assert plist["StandardOutPath"] == str(log) == plist["StandardErrorPath"]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert (root / log.parent.relative_to("/")).is_dir()
    assert f"launchctl bootstrap gui/$(id -u) {home}/Library/LaunchAgents" in out.getvalue()


def test_launchd_default_config_is_users_config(
    tmp_path: Path, fake_nodectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENJAMBRE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    result = install(
        "launchd", nodectl_path=fake_nodectl, dest_root=tmp_path / "r", out=io.StringIO()
    )
    assert result.config_path == tmp_path / "cfg" / "enjambre" / "node.toml"


# --- errors a user can cause ------------------------------------------------------------


def test_nodectl_not_executable(tmp_path: Path) -> None:
    plain = tmp_path / "nodectl"
    plain.write_text("not executable")
    plain.chmod(0o644)
    with pytest.raises(InstallError, match="not an executable file; pass --nodectl"):
        install("systemd", nodectl_path=plain, dest_root=tmp_path, out=io.StringIO())
    with pytest.raises(InstallError, match="not an executable file"):
        install("systemd", nodectl_path=tmp_path / "missing", dest_root=tmp_path, out=io.StringIO())


def test_bad_user_name(tmp_path: Path, fake_nodectl: Path) -> None:
    for bad in ("Bad User", "enjambre\nExecStartPre=/bin/evil", ""):
        with pytest.raises(InstallError, match="not a valid user name"):
            install("systemd", nodectl_path=fake_nodectl, user=bad, dest_root=tmp_path)


def test_needs_root_for_real_install(
    tmp_path: Path, fake_nodectl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(service, "SYSTEMD_DIR", tmp_path / "systemd")
    with pytest.raises(InstallError, match="need root; run `sudo nodectl service install`"):
        install("systemd", nodectl_path=fake_nodectl, out=io.StringIO())
    assert not (tmp_path / "systemd").exists()


def test_missing_template(tmp_path: Path, fake_nodectl: Path) -> None:
    with pytest.raises(InstallError, match=r"cannot read the service template.*--templates"):
        install(
            "systemd", nodectl_path=fake_nodectl, dest_root=tmp_path, templates=tmp_path / "none"
        )


def test_broken_templates() -> None:
    with pytest.raises(InstallError, match="lacks ExecStart"):
        render_systemd(
            "[Service]\nUser=x\nGroup=x\nProtectHome=yes\nEnvironment=ENJAMBRE_CONFIG=/x\n",
            nodectl_path=Path("/bin/true"),
            config_path=Path("/x"),
        )
    with pytest.raises(InstallError, match="not a valid plist"):
        render_launchd(
            b"<plist>", nodectl_path=Path("/a"), config_path=Path("/b"), log_path=Path("/c")
        )


def test_main_cli(tmp_path: Path, fake_nodectl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    code = nodectl(
        ["service", "install", "--kind", "systemd", "--nodectl", str(fake_nodectl), "--dest-root", str(root)]
    )
    assert code == 0
    assert (root / "etc" / "systemd" / "system" / "enjambre.service").is_file()
    assert "next:" in capsys.readouterr().out
    code = nodectl(["service", "install", "--kind", "systemd", "--nodectl", str(tmp_path / "nope")])
    assert code == 1
    assert "nodectl: service: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        nodectl(["service", "install", "--kind", "upstart"])
    assert info.value.code == 2


def test_install_service_script(tmp_path: Path, fake_nodectl: Path) -> None:
    script = REPO / "scripts" / "install-service"
    assert os.access(script, os.X_OK)
    result = subprocess.run(
        [str(script), "--kind", "launchd", "--nodectl", str(fake_nodectl), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "would write" in result.stdout and "com.enjambre.node" in result.stdout
