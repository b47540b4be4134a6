"""What a model may make a node fetch and read besides its weights: a cap per kind of file.

Every node that serves any layers of a model fetches all its small files whole (config,
tokenizer, template...) and the header of each weight file (``[0, data_start)``), and
reads several of them into memory: config.json is parsed where the stage is built, the
tokenizer files go to the tokenizers library, a GGUF's header to protocol/gguf.py. A
model comes from any member of the cluster, so its manifest is checked against these
caps before a single piece is fetched (and an import is checked the same way, so a
model that peers would refuse is refused where it is imported, saying why). A 192 MiB
config.json or a 120 MiB GGUF header used to cost each node 0.5 GiB and stall it for
seconds; now it is refused, naming the file and the cap.

The caps, each well above what real models ship:

* config.json, generation_config.json, chat_template.jinja: 1 MiB (real ones are 1 to
  50 KB);
* tokenizer_config.json: 8 MiB (Gemma 3's, every added token listed, is 1.2 MB; the
  /api/show reader already takes at most 8 MiB of it);
* tokenizer.json: 48 MiB (Gemma 3's 262k-token vocabulary is 33 MB, Gemma 2's 17 MB,
  Llama 3's 9 MB);
* any other small file: 64 MiB, what the importer takes at all;
* a weight file's header: 16 MiB for safetensors (a 400B model's shards have about
  100 KB each; 16 MiB is a single file of 100k tensors) and, for a GGUF,
  protocol/gguf.py's ``MAX_HEADER_BYTES`` plus the largest alignment padding, so a
  header the parser would refuse is never fetched;
* all small files and headers together: 256 MiB (Gemma 3 needs about 40 MB), which
  bounds what a stage fetches before its layers however many files a model lists.

Pure: a manifest (or a list of files) in, ``ModelTooLarge`` out.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from protocol.gguf import MAX_HEADER_BYTES as MAX_GGUF_HEADER
from protocol.manifest import Manifest, ManifestError

__all__ = ["DEFAULT_LIMITS", "SMALL_FILE_CAPS", "ModelLimits", "ModelTooLarge", "check_files", "check_model"]

MiB = 2**20
SMALL_FILE_CAPS: Mapping[str, int] = MappingProxyType({
    "config.json": 1 * MiB,
    "generation_config.json": 1 * MiB,
    "chat_template.jinja": 1 * MiB,
    "tokenizer_config.json": 8 * MiB,
    "tokenizer.json": 48 * MiB,
})
_GGUF_ALIGNMENT = 1 << 16  # the largest general.alignment protocol/gguf.py accepts


class ModelTooLarge(ManifestError):
    """A model with a file over its cap (the message names the file and the cap)."""


@dataclass(frozen=True, slots=True)
class ModelLimits:
    small: Mapping[str, int] = field(default_factory=lambda: SMALL_FILE_CAPS)  # by file name
    other: int = 64 * MiB  # any other small file
    safetensors_header: int = 16 * MiB
    gguf_header: int = MAX_GGUF_HEADER + _GGUF_ALIGNMENT
    together: int = 256 * MiB  # small files and headers, all of them


DEFAULT_LIMITS = ModelLimits()


def check_model(manifest: Manifest, limits: ModelLimits = DEFAULT_LIMITS) -> None:
    """ModelTooLarge unless every file of ``manifest`` is within ``limits``."""
    check_files(((f.path, f.size, f.data_start) for f in manifest.files),
                gguf=manifest.summary.get("format") == "gguf", limits=limits,
                model=f"model {manifest.model_id[:12]}")


def check_files(
    files: Iterable[tuple[str, int, int | None]], *, gguf: bool, limits: ModelLimits = DEFAULT_LIMITS,
    model: str = "the model",
) -> None:
    """The same check on ``(path, size, data_start)`` of each file (data_start None: a
    small file, fetched whole), for an import that has not built its manifest yet."""
    together = 0
    for path, size, data_start in files:
        name = posixpath.basename(path)
        cap = limits.small.get(name)
        if cap is not None and size > cap:  # whatever the manifest says it is
            raise ModelTooLarge(_refusal(model, path, f"is {_mib(size)}", f"a {name} may have {_mib(cap)}"))
        if data_start is None:
            cap = limits.other if cap is None else cap
            if size > cap:
                raise ModelTooLarge(_refusal(model, path, f"is {_mib(size)}", f"a small file may have {_mib(cap)}"))
            together += size
            continue
        kind, cap = ("GGUF", limits.gguf_header) if gguf else ("safetensors", limits.safetensors_header)
        if data_start > cap:
            raise ModelTooLarge(_refusal(model, path, f"has a header of {_mib(data_start)}",
                                         f"a {kind} header may have {_mib(cap)}"))
        together += data_start
    if together > limits.together:
        raise ModelTooLarge(
            f"{model}'s small files and weight headers are {_mib(together)} together; every node that "
            f"serves any of its layers fetches them all, and at most {_mib(limits.together)} are accepted: "
            "refused before fetching anything"
        )


def _refusal(model: str, path: str, what: str, cap: str) -> str:
    return (f"{model}: {path} {what}; {cap} at most: refused before fetching anything "
            "(re-export the model with a smaller file, or ask whoever published it)")


def _mib(n: int) -> str:
    return f"{n} bytes" if n < MiB else f"{n / MiB:.1f} MiB"
