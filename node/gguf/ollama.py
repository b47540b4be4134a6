"""Finding a model in a local Ollama store (``ollama:NAME[:TAG]``).

Ollama keeps ``$OLLAMA_MODELS`` (default ``~/.ollama/models``) as an OCI-style
store: ``manifests/<registry>/<namespace>/<name>/<tag>`` is a small JSON document
whose layers name blobs by digest, and ``blobs/sha256-<hex>`` holds each blob. The
layer of media type ``application/vnd.ollama.image.model`` is the GGUF. Short
names follow Ollama's defaults: ``qwen2.5`` is
``registry.ollama.ai/library/qwen2.5:latest``. The blob's digest is checked by the
import as it hashes the file (node/store/gguf_import.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OllamaError", "OllamaModel", "find_model", "ollama_root"]

_MODEL = "application/vnd.ollama.image.model"
_LICENSE = "application/vnd.ollama.image.license"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_MANIFEST = 1 << 20
_MAX_LICENSE = 1 << 20


class OllamaError(LookupError):
    """A model that is not (usably) in the Ollama store (the message says why)."""


@dataclass(frozen=True)
class OllamaModel:
    name: str  # name:tag
    blob: Path  # the GGUF
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


def _blob(root: Path, digest: object) -> tuple[Path, str]:
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if match is None:
        raise OllamaError(f"the Ollama manifest names a blob {str(digest)[:80]!r} that is not a sha256 digest")
    return root / "blobs" / f"sha256-{match.group(1)}", match.group(1)


def find_model(ref: str, root: Path | None = None) -> OllamaModel:
    """The GGUF blob (and license) of ``ref`` in the Ollama store at ``root``."""
    root = root or ollama_root()
    registry, namespace, name, tag = _parts(ref)
    path = root / "manifests" / registry / namespace / name / tag
    try:
        raw = path.read_bytes()[: _MAX_MANIFEST + 1]
    except OSError:
        raise OllamaError(
            f"{name}:{tag} is not in the Ollama store at {root} (no {path}); `ollama pull {name}:{tag}` "
            "on this machine first, or set OLLAMA_MODELS"
        ) from None
    if len(raw) > _MAX_MANIFEST:
        raise OllamaError(f"{path} is too large to be an Ollama manifest")
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
    blob, sha = _blob(root, model[0].get("digest"))
    if not blob.is_file():
        raise OllamaError(f"the GGUF blob {blob} is missing from the Ollama store")
    size = blob.stat().st_size
    if model[0].get("size") not in (None, size):
        raise OllamaError(f"{blob} has {size} bytes; the manifest says {model[0].get('size')}")
    extra: dict[str, bytes] = {}
    for x in layers:
        if isinstance(x, dict) and x.get("mediaType") == _LICENSE:
            lic, _ = _blob(root, x.get("digest"))
            try:
                if lic.stat().st_size <= _MAX_LICENSE:
                    extra["LICENSE"] = extra.get("LICENSE", b"") + lic.read_bytes()
            except OSError:
                pass
    return OllamaModel(f"{name}:{tag}", blob, sha, size, extra)
