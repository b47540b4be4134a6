"""Writing config files: the commented TOML ``nodectl init`` writes, and the shipped example.

``render_config`` turns ``{section: {key: value}}`` into a self-explaining file: every
section and key of the schema (``node.config_schema``) in schema order, each under its
doc text; keys given a value are written set, every other key is written commented out
with its default (or an example, for keys whose default depends on the machine).
``configs/node.example.toml`` is ``render_example()`` and a test keeps it so; after
changing the schema regenerate it with::

    python -m node.config --example > configs/node.example.toml

Values are formatted by ``tomli_w`` (quoting and escaping are its job, not ours), and
``write_config`` replaces the file atomically through ``node.system.files``.
"""

from __future__ import annotations

import os
import textwrap
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from node.config_schema import Key, keys, sections
from node.system.files import atomic_write

__all__ = ["example_values", "render_config", "render_example", "update_config", "write_config"]

_WIDTH = 80

HEADER = """\
enjambre node configuration.

One file per machine. `nodectl init` writes a starting version of this file;
`nodectl serve --config PATH` reads it (default: $ENJAMBRE_CONFIG, else
~/.config/enjambre/node.toml; the system service uses
/etc/enjambre/node.toml).

Every key is optional except cluster.secret_file. A commented-out key shows
its default, or an example where the default depends on the machine.
Relative paths are relative to the directory of THIS file, and "~" expands
to the home directory.

Sizes are bytes or strings with a unit: B, KB/MB/GB/TB (powers of 1000) or
KiB/MiB/GiB/TiB (powers of 1024), e.g. "512MiB", "8 GB", "1.5 GiB".
Single letters such as "8G" are refused because they are ambiguous.
"""


def _comment(text: str) -> list[str]:
    lines: list[str] = []
    for paragraph in text.strip().split("\n\n"):
        if lines:
            lines.append("#")
        # No breaking on hyphens: "--secret-file" must stay in one piece.
        wrapped = textwrap.wrap(
            " ".join(paragraph.split()),
            width=_WIDTH - 2,
            break_long_words=False,
            break_on_hyphens=False,
        )
        lines.extend(f"# {line}" for line in wrapped)
    return lines


def _header() -> list[str]:
    # The header is laid out by hand (paragraphs and line breaks), so it is not re-wrapped.
    return [f"# {line}".rstrip() for line in HEADER.split("\n")[:-1]]


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(item, where) for item in value]
    if isinstance(value, Mapping):
        # tomli_w would write a sub-table; no key of the schema holds one.
        raise ValueError(f"{where}: cannot write a table ({value!r}); the schema has none")
    return value


def _assignment(name: str, value: Any, where: str) -> list[str]:
    try:
        text = tomli_w.dumps({name: _plain(value, where)})
    except TypeError:
        raise ValueError(
            f"{where}: cannot write {type(value).__name__} {value!r} to TOML "
            "(strings, numbers, booleans, paths and lists of those only)"
        ) from None
    # split("\n"), not splitlines(): a string value may hold U+0085 or U+2028 unescaped.
    return text.rstrip("\n").split("\n")


def _check_known(values: Mapping[str, Mapping[str, Any]]) -> None:
    # A key the schema does not know would be written, then refused by load_config.
    known = sections()
    for section, table in values.items():
        if section not in known:
            raise ValueError(f"unknown config section {section!r} (sections: {', '.join(known)})")
        if not isinstance(table, Mapping):
            raise ValueError(f"section {section!r} must be a dict of key -> value")
        fields = keys(known[section])
        for name in table:
            if name not in fields:
                raise ValueError(f"unknown config key {section}.{name} (keys: {', '.join(fields)})")


def render_config(values: Mapping[str, Mapping[str, Any]]) -> str:
    """The commented config file with ``values`` set; a value of None counts as not set.

    Values are given as they are written in the file (strings for paths and sizes,
    ``"HOST:PORT"`` strings for bootstrap); ``Path`` objects and tuples are accepted.
    Raises ``ValueError`` for a section or key the schema does not have, or a value
    TOML cannot hold. The result parses back with ``tomllib`` to ``values``.
    """
    _check_known(values)
    lines = _header()
    for section, cls in sections().items():
        given = values.get(section, {})
        lines += ["", "", f"[{section}]"]
        lines += _comment(cls.__doc__ or "")
        for name, spec in keys(cls).items():
            lines.append("")
            lines += _comment(spec.doc)
            where = f"{section}.{name}"
            if given.get(name) is not None:
                lines += _assignment(name, given[name], where)
            else:
                lines += [f"# {line}" for line in _assignment(name, spec.shown, where)]
    return "\n".join(lines) + "\n"


def _example_value(spec: Key) -> Any:
    # Set in the example: keys with a fixed default (at that default) and required keys
    # (at their example). Keys whose default depends on the machine stay commented out.
    if spec.default is not None:
        return spec.default
    return spec.example if spec.required else None


def example_values() -> dict[str, dict[str, Any]]:
    """The values ``configs/node.example.toml`` sets."""
    out: dict[str, dict[str, Any]] = {}
    for section, cls in sections().items():
        table = {name: _example_value(spec) for name, spec in keys(cls).items()}
        out[section] = {name: value for name, value in table.items() if value is not None}
    return out


def render_example() -> str:
    """The text of ``configs/node.example.toml``."""
    return render_config(example_values())


def write_config(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (mode 0644, it holds no secrets); create parents."""
    atomic_write(Path(path).expanduser(), text, mode=0o644)


def update_config(path: Path, values: Mapping[str, Mapping[str, Any]]) -> None:
    """Set ``values`` in the config at ``path`` (a file ``render_config`` wrote), keeping the rest.

    The file is rendered again, so comments a person added by hand are not kept: this
    is for tools that adjust a file ``nodectl init`` has just written.
    """
    path = Path(path).expanduser()
    merged: dict[str, dict[str, Any]] = {
        section: dict(table) for section, table in tomllib.loads(path.read_text("utf-8")).items()
    }
    for section, table in values.items():
        merged.setdefault(section, {}).update(table)
    write_config(path, render_config(merged))
