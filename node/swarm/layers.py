"""The pieces a node needs to serve a range of a model's layers (a pure function of the manifest).

For layers ``[start, end)`` a node needs every piece that overlaps the bytes of
``model.layers.{i}.*`` for those layers, the embedding when it runs the first
partition, the final norm and the LM head (or the tied embedding) when it runs the
last, the headers of the weight files (the engine indexes tensors through them),
and every small file (config, tokenizer). Nothing else: four nodes that each serve
a quarter of the layers together fetch the model about once.
"""

from __future__ import annotations

import re

from protocol.manifest import Manifest

__all__ = ["pieces_for_layers"]

# A multimodal checkpoint's language model (Gemma 3) under its prefix: the same pieces.
_LM = r"^(?:model\.|language_model\.model\.|model\.language_model\.)"
_LAYER = re.compile(_LM + r"layers\.(\d+)\.")
_EMBED = re.compile(_LM + r"embed_tokens\.weight$")
_HEAD = re.compile(_LM + r"norm\.weight$|^(?:language_model\.)?lm_head\.weight$")
# An encoder (BERT) runs whole on one node: its stage holds the embedding and the "head".
_ENCODER = re.compile(r"^(bert\.)?(embeddings|encoder)\.")


def pieces_for_layers(manifest: Manifest, start: int, end: int, *, has_embedding: bool, has_head: bool) -> set[int]:
    names = {t.name for t in manifest.tensors}
    ranges: list[tuple[str, int, int]] = []
    for t in manifest.tensors:
        match = _LAYER.match(t.name)
        if match is not None:
            wanted = start <= int(match.group(1)) < end
        elif _ENCODER.match(t.name) is not None:
            wanted = has_embedding and has_head
        elif _EMBED.match(t.name) is not None:
            # A tied head is the embedding table: the last partition needs it too.
            wanted = has_embedding or (has_head and not any(n.endswith("lm_head.weight") for n in names))
        else:
            wanted = has_head and _HEAD.match(t.name) is not None
        if wanted:
            ranges.append((t.file, t.offset, t.length))
    for f in manifest.files:
        if f.data_start is not None:
            ranges.append((f.path, 0, f.data_start))  # the header
        else:
            ranges.append((f.path, 0, f.size))  # a small file, whole
    return manifest.pieces_for_ranges(ranges)
