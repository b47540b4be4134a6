"""Finding a model in a local Ollama store (``ollama:NAME[:TAG]``).

Ollama keeps ``$OLLAMA_MODELS`` (default ``~/.ollama/models``) as an OCI-style
store: ``manifests/<registry>/<namespace>/<name>/<tag>`` is a small JSON document
whose layers name blobs by digest, and ``blobs/sha256-<hex>`` holds each blob. The
layer of media type ``application/vnd.ollama.image.model`` is the GGUF. Short
names follow Ollama's defaults: ``qwen2.5`` is
``registry.ollama.ai/library/qwen2.5:latest``.

What the store holds is not trusted: whatever is imported is published to the
cluster. A link that leads out of the store is not followed (a license "blob"
linked to this node's secret would be published as the model's LICENSE); the
manifest and the license are read only as far as their caps (a manifest linked to
/dev/zero) and only from regular files; the license must hash to its digest. The
GGUF's digest is checked by the import as it hashes the file for its pieces
(node/store/gguf_import.py), so it is read once; ``blob`` is its path with the
links resolved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OllamaError", "OllamaModel", "find_model", "ollama_root"]

_MODEL = "application/vnd.ollama.image.model"
_LICENSE = "application/vnd.ollama.image.license"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MANIFEST = 1 << 20  # Ollama's manifests are under 1 KB
MAX_LICENSE = 1 << 20  # the longest licenses (Llama's, Gemma's) are 10 to 30 KB


class OllamaError(LookupError):
    """A model that is not (usably) in the Ollama store (the message says why)."""


@dataclass(frozen=True)
class OllamaModel:
    name: str  # name:tag
    blob: Path  # the GGUF, links resolved
    sha256: str
    size: int
    extra: dict[str, bytes] = field(default_factory=dict)  # LICENSE


def ollama_root() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def _parts(ref: str) -> tuple[str, str, str, str]:
    name, _, tag = ref.strip().partition(":")
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    tag = tag or "latest"
    if len(parts) != 3 or not all(_PART.match(p) for p in (*parts, tag)):
        raise OllamaError(f"{ref!r} is not an Ollama model name (like qwen2.5:0.5b or user/model:tag)")
    return parts[0], parts[1], parts[2], tag


def _inside(root: Path, path: Path) -> Path:
    """``path`` with its links resolved; OllamaError if that is outside ``root`` (resolved)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise OllamaError(
            f"{path} is a link to {real}, outside the Ollama store at {root}; refusing to read it "
            "(a store's files are its own; remove the link or copy the file in)"
        )
    return real


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    """At most ``cap`` bytes of the regular file ``path`` (no more than cap + 1 are read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # no wait on a FIFO
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OllamaError(f"{path} is not a regular file; it cannot be {what}")
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise OllamaError(f"{path} is over {cap} bytes, too large to be {what}")
    return data


def _blob(root: Path, digest: object) -> tuple[Path, str]:
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise OllamaError(f"the Ollama manifest names a blob {str(digest)[:80]!r} that is not a sha256 digest")
    return root / "blobs" / f"sha256-{match.group(1)}", match.group(1)


def _license(root: Path, layer: dict[str, object]) -> bytes:
    path, sha = _blob(root, layer.get("digest"))
    try:
        data = _read_capped(_inside(root, path), MAX_LICENSE, "a license")
    except FileNotFoundError:
        raise OllamaError(f"the license blob {path} is missing from the Ollama store") from None
    except OSError as exc:
        raise OllamaError(f"cannot read the license blob {path}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise OllamaError(f"{path} does not hash to the digest it is named by: the Ollama store is damaged")
    return data


def find_model(ref: str, root: Path | None = None) -> OllamaModel:
    """The GGUF blob (and license) of ``ref`` in the Ollama store at ``root``."""
    root = Path(os.path.realpath(root or ollama_root()))
    registry, namespace, name, tag = _parts(ref)
    path = root / "manifests" / registry / namespace / name / tag
    try:
        raw = _read_capped(_inside(root, path), MAX_MANIFEST, "an Ollama manifest")
    except FileNotFoundError:
        raise OllamaError(
            f"{name}:{tag} is not in the Ollama store at {root} (no {path}); `ollama pull {name}:{tag}` "
            "on this machine first, or set OLLAMA_MODELS"
        ) from None
    except OSError as exc:
        raise OllamaError(f"cannot read the Ollama manifest {path}: {exc}") from None
    try:
        doc = json.loads(raw)
        layers = doc["layers"]
        if not isinstance(layers, list):
            raise TypeError("layers is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise OllamaError(f"{path} is not an Ollama manifest ({exc})") from None
    model = [x for x in layers if isinstance(x, dict) and x.get("mediaType") == _MODEL]
    if len(model) != 1:
        raise OllamaError(f"{path} has {len(model)} model layers; expected one GGUF (adapters are not supported)")
    named, sha = _blob(root, model[0].get("digest"))
    blob = _inside(root, named)
    try:
        info = blob.stat()
    except OSError:
        raise OllamaError(f"the GGUF blob {named} is missing from the Ollama store") from None
    if not stat.S_ISREG(info.st_mode):
        raise OllamaError(f"the GGUF blob {named} is not a regular file")
    if model[0].get("size") not in (None, info.st_size):
        raise OllamaError(f"{named} has {info.st_size} bytes; the manifest says {model[0].get('size')}")
    licenses = [x for x in layers if isinstance(x, dict) and x.get("mediaType") == _LICENSE]
    if len(licenses) > 16:
        raise OllamaError(f"{path} lists {len(licenses)} licenses; a model has one or two")
    text = b"".join(_license(root, x) for x in licenses)
    if len(text) > MAX_LICENSE:
        raise OllamaError(f"the licenses {path} lists are over {MAX_LICENSE} bytes together")
    extra = {"LICENSE": text} if text else {}
    return OllamaModel(f"{name}:{tag}", blob, sha, info.st_size, extra)
