"""Installing the node as an OS service: a systemd unit on Linux, a launchd agent on macOS.

Owns ``install`` (behind ``nodectl service install``, whose flags are in node/cli.py, and
``scripts/install-service``):
it renders ``configs/enjambre.service`` or ``configs/com.enjambre.node.plist`` with the
real ``nodectl`` and config paths, writes it where the service manager looks, creates
the ``enjambre`` system user on Linux when missing, and prints the commands to start
the service. ``dest_root`` redirects every write into a directory (tests, packaging)
and skips creating users; ``dry_run`` prints what would happen and changes nothing.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from node.system.files import atomic_write

__all__ = [
    "LAUNCHD_LABEL",
    "SYSTEMD_UNIT",
    "InstallError",
    "InstallResult",
    "install",
    "render_launchd",
    "render_systemd",
]

Kind = Literal["systemd", "launchd"]

SYSTEMD_UNIT = "enjambre.service"
LAUNCHD_LABEL = "com.enjambre.node"
DEFAULT_USER = "enjambre"
SYSTEMD_CONFIG = Path("/etc/enjambre/node.toml")
SYSTEMD_DATA_DIR = Path("/var/lib/enjambre")
SYSTEMD_DIR = Path("/etc/systemd/system")
# configs/ holds the templates; node/data links to them so a built wheel carries them.
TEMPLATES = Path(__file__).resolve().parents[1] / "data"
# ProtectHome=yes makes these invisible to the service.
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))


class InstallError(Exception):
    """The service cannot be installed; the message says what to do."""


@dataclass(frozen=True)
class InstallResult:
    kind: Kind
    path: Path  # where the unit/plist was (or would be) written
    content: str
    nodectl_path: Path
    config_path: Path
    user: str | None  # systemd only
    user_created: bool
    written: bool
    next_commands: tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Rendering


def _systemd_quote(text: str) -> str:
    # '%' starts a specifier in unit files; whitespace and quotes split arguments.
    escaped = text.replace("%", "%%")
    if any(ch in escaped for ch in " \t\"'\\;"):
        return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def _under_home(path: Path) -> bool:
    return any(path == root or root in path.parents for root in HOME_ROOTS)


def render_systemd(
    template: str,
    *,
    nodectl_path: Path,
    config_path: Path,
    user: str = DEFAULT_USER,
    extra_writable: Sequence[Path] = (),
) -> str:
    """The unit text with our paths and user filled in.

    When the executable, the config or a writable path lives under a home directory,
    ``ProtectHome=yes`` would hide it from the service, so it becomes ``read-only``
    (plus ``ReadWritePaths=`` for ``extra_writable``).
    """
    exec_line = (
        f"ExecStart={_systemd_quote(str(nodectl_path))} serve --config "
        f"{_systemd_quote(str(config_path))}"
    )
    env_line = f"Environment={_systemd_quote(f'ENJAMBRE_CONFIG={config_path}')}"
    in_home = any(_under_home(p) for p in (nodectl_path, config_path, *extra_writable))
    replacements = {
        "ExecStart=": exec_line,
        "Environment=ENJAMBRE_CONFIG=": env_line,
        "User=": f"User={user}",
        "Group=": f"Group={user}",
        "ProtectHome=": f"ProtectHome={'read-only' if in_home else 'yes'}",
    }
    seen: set[str] = set()
    lines: list[str] = []
    for line in template.splitlines():
        for prefix, new in replacements.items():
            if line.startswith(prefix):
                line = new
                seen.add(prefix)
                break
        lines.append(line)
        if line.startswith("StateDirectory=") and extra_writable:
            lines.append(
                "ReadWritePaths=" + " ".join(_systemd_quote(str(p)) for p in extra_writable)
            )
    missing = [prefix.rstrip("=") for prefix in replacements if prefix not in seen]
    if missing:
        raise InstallError(f"the unit template lacks {', '.join(missing)}; restore it from git")
    return "\n".join(lines) + "\n"


def render_launchd(
    template: bytes, *, nodectl_path: Path, config_path: Path, log_path: Path
) -> bytes:
    """The plist with our paths filled in (parsed and re-written, not string-patched)."""
    try:
        plist = plistlib.loads(template)
    except Exception as exc:  # plistlib raises several types for bad input
        raise InstallError(f"the launchd template is not a valid plist: {exc}") from None
    if not isinstance(plist, dict):
        raise InstallError("the launchd template must hold a <dict>")
    plist["Label"] = LAUNCHD_LABEL
    plist["ProgramArguments"] = [str(nodectl_path), "serve", "--config", str(config_path)]
    env = plist.get("EnvironmentVariables")
    env = dict(env) if isinstance(env, dict) else {}
    env["ENJAMBRE_CONFIG"] = str(config_path)
    plist["EnvironmentVariables"] = env
    plist["StandardOutPath"] = str(log_path)
    plist["StandardErrorPath"] = str(log_path)
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=False)


# ---------------------------------------------------------------------------------------
# Installing


def _default_kind() -> Kind:
    if sys.platform.startswith("linux"):
        return "systemd"
    if sys.platform == "darwin":
        return "launchd"
    raise InstallError(
        f"no service manager support for {sys.platform}; run `nodectl serve` under your "
        "own supervisor instead"
    )


def _find_nodectl() -> Path:
    # The nodectl next to the running Python belongs to the environment enjambre is in.
    beside = Path(sys.executable).parent / "nodectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside.absolute()
    found = shutil.which("nodectl")
    if found:
        return Path(found).absolute()
    raise InstallError("cannot find the nodectl executable; pass --nodectl PATH")


def _check_executable(path: Path) -> None:
    if not path.is_file() or not os.access(path, os.X_OK):
        raise InstallError(
            f"{path} is not an executable file; pass --nodectl with the path of nodectl "
            "(e.g. the one in the virtual environment enjambre is installed in)"
        )


def _rooted(dest_root: Path | None, path: Path) -> Path:
    if dest_root is None:
        return path
    return dest_root / path.relative_to(path.anchor)


def _configured_data_dir(config_path: Path) -> Path | None:
    # Only a peek: the full load_config also checks secrets that root may not own yet.
    try:
        document = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    node = document.get("node")
    value = node.get("data_dir") if isinstance(node, dict) else None
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else config_path.parent / path


def _user_exists(name: str) -> bool:
    try:
        import pwd
    except ImportError:  # pragma: no cover - not on POSIX
        return True
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _useradd_command(user: str) -> list[str]:
    nologin = next(
        (p for p in ("/usr/sbin/nologin", "/sbin/nologin", "/usr/bin/nologin") if Path(p).exists()),
        "/bin/false",
    )
    return [
        "useradd",
        "--system",
        "--user-group",
        "--home-dir",
        str(SYSTEMD_DATA_DIR),
        "--no-create-home",
        "--shell",
        nologin,
        "--comment",
        "enjambre node",
        user,
    ]


def _create_user(user: str) -> None:
    command = _useradd_command(user)
    if shutil.which(command[0]) is None:
        raise InstallError(
            f"useradd not found; create a system user named {user!r} with your system's "
            "tools, or pass --user with an existing one"
        )
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise InstallError(
            f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}"
        )


def install(
    kind: Kind | None = None,
    *,
    nodectl_path: Path | None = None,
    config_path: Path | None = None,
    dry_run: bool = False,
    dest_root: Path | None = None,
    user: str | None = None,
    templates: Path | None = None,
    out: TextIO | None = None,
) -> InstallResult:
    """Install the service for this OS (or ``kind``); see the module docstring."""
    stream = out if out is not None else sys.stdout
    user = DEFAULT_USER if user is None else user
    templates = TEMPLATES if templates is None else templates
    if not _USER_RE.fullmatch(user):
        raise InstallError(
            f"{user!r} is not a valid user name; use lower-case letters, digits, '_' and '-'"
        )
    chosen: Kind = kind or _default_kind()
    if chosen not in ("systemd", "launchd"):
        raise InstallError(f"unknown service kind {chosen!r}; use systemd or launchd")
    nodectl = Path(nodectl_path).expanduser().absolute() if nodectl_path else _find_nodectl()
    _check_executable(nodectl)
    if config_path is None:
        from node.config import default_config_path

        config_path = SYSTEMD_CONFIG if chosen == "systemd" else default_config_path()
    config = Path(config_path).expanduser().absolute()
    if dest_root is not None:
        dest_root = Path(dest_root).absolute()

    if chosen == "systemd":
        return _install_systemd(nodectl, config, user, dry_run, dest_root, templates, stream)
    return _install_launchd(nodectl, config, dry_run, dest_root, templates, stream)


def _read_template(templates: Path, name: str) -> bytes:
    path = templates / name
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InstallError(
            f"cannot read the service template {path}: {exc.strerror or exc}; run from an "
            "enjambre source checkout or pass --templates DIR"
        ) from None


def _install_systemd(
    nodectl: Path,
    config: Path,
    user: str,
    dry_run: bool,
    dest_root: Path | None,
    templates: Path,
    out: TextIO,
) -> InstallResult:
    template = _read_template(templates, SYSTEMD_UNIT).decode("utf-8")
    data_dir = _configured_data_dir(config)
    writable = (
        [data_dir]
        if data_dir is not None
        and data_dir != SYSTEMD_DATA_DIR
        and SYSTEMD_DATA_DIR not in data_dir.parents
        else []
    )
    content = render_systemd(
        template, nodectl_path=nodectl, config_path=config, user=user, extra_writable=writable
    )
    target = _rooted(dest_root, SYSTEMD_DIR / SYSTEMD_UNIT)
    touches_system = dest_root is None and not dry_run
    if touches_system and hasattr(os, "geteuid") and os.geteuid() != 0:
        raise InstallError(
            f"writing {target} and creating the {user!r} user need root; run "
            "`sudo nodectl service install` (add --dry-run to see what it would do)"
        )
    need_user = not _user_exists(user)
    user_created = False
    if need_user:
        if dest_root is not None:
            print(f"skipping: create system user {user!r} (installing under {dest_root})", file=out)
        elif dry_run:
            print(f"would run: {' '.join(_useradd_command(user))}", file=out)
        else:
            _create_user(user)
            user_created = True
            print(f"created system user {user!r}", file=out)
    if writable:
        print(
            f"note: data_dir {writable[0]} is outside {SYSTEMD_DATA_DIR}; allowed with ReadWritePaths=",
            file=out,
        )
    if _under_home(nodectl) or _under_home(config) or any(_under_home(p) for p in writable):
        print(
            "note: nodectl, the config or data_dir is under a home directory; the unit uses "
            "ProtectHome=read-only instead of yes (install enjambre under /opt for full isolation)",
            file=out,
        )
    if dry_run:
        print(f"would write {target}:\n{content}", file=out)
    else:
        atomic_write(target, content.encode())
        print(f"wrote {target}", file=out)

    commands: list[str] = []
    if not config.exists():
        commands.append(
            f"sudo {nodectl} init --config {config} --data-dir {SYSTEMD_DATA_DIR} "
            "--listen <this machine's LAN address> (--new-cluster, or --secret-file FILE to join)"
        )
    owned = data_dir or SYSTEMD_DATA_DIR
    if config.parent == SYSTEMD_CONFIG.parent:
        commands.append(f"sudo chown -R {user}:{user} {config.parent} {owned}")
    else:
        # Never chown -R a directory we do not own (it may be someone's home).
        commands.append(
            f"sudo chown {user}:{user} {config} <its secret_file> && "
            f"sudo chown -R {user}:{user} {owned}"
        )
    commands.append("sudo systemctl daemon-reload && sudo systemctl enable --now enjambre")
    commands.append("journalctl -u enjambre -f")
    _print_next(commands, out)
    return InstallResult(
        kind="systemd",
        path=target,
        content=content,
        nodectl_path=nodectl,
        config_path=config,
        user=user,
        user_created=user_created,
        written=not dry_run,
        next_commands=tuple(commands),
    )


def _install_launchd(
    nodectl: Path,
    config: Path,
    dry_run: bool,
    dest_root: Path | None,
    templates: Path,
    out: TextIO,
) -> InstallResult:
    home = Path.home()
    log_path = home / "Library" / "Logs" / "enjambre" / "node.log"
    content = render_launchd(
        _read_template(templates, f"{LAUNCHD_LABEL}.plist"),
        nodectl_path=nodectl,
        config_path=config,
        log_path=log_path,
    )
    target = _rooted(dest_root, home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist")
    log_dir = _rooted(dest_root, log_path.parent)
    if dry_run:
        print(f"would create {log_dir}", file=out)
        print(f"would write {target}:\n{content.decode()}", file=out)
    else:
        # launchd opens the log file but does not create its directory.
        log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(target, content)
        print(f"wrote {target}", file=out)
    commands: list[str] = []
    if not config.exists():
        commands.append(
            f"{nodectl} init --config {config} --listen <this machine's LAN address> "
            "(--new-cluster, or --secret-file FILE to join)"
        )
    agent = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    commands.append(f"launchctl bootstrap gui/$(id -u) {agent}")
    commands.append(f"tail -f {log_path}")
    _print_next(commands, out)
    return InstallResult(
        kind="launchd",
        path=target,
        content=content.decode(),
        nodectl_path=nodectl,
        config_path=config,
        user=None,
        user_created=False,
        written=not dry_run,
        next_commands=tuple(commands),
    )


def _print_next(commands: Sequence[str], out: TextIO) -> None:
    print("\nnext:", file=out)
    for command in commands:
        print(f"  {command}", file=out)
