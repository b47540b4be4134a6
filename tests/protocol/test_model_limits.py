"""protocol/model_limits.py: what a model may make a node fetch besides its weights, by kind of file."""

from __future__ import annotations

import pytest

from protocol.manifest import ManifestFile, build_manifest
from protocol.model_limits import (
    DEFAULT_LIMITS,
    ModelLimits,
    ModelTooLarge,
    check_files,
    check_model,
)

MiB = 2**20
BIG_PIECE = 64 * MiB  # the largest piece size: a manifest of large files stays a few hashes
SMALL = ModelLimits(small={"config.json": 100, "tokenizer.json": 1000}, other=500, safetensors_header=300,
                    gguf_header=400, together=1500)


def test_real_models_fit() -> None:
    """Gemma 3's files (the largest tokenizer shipped), a GGUF with a 20 MB header, a
    400B model's 191 shard headers: all within the default caps."""
    gemma = [("config.json", 2_000, None), ("tokenizer.json", 33_384_568, None),
             ("tokenizer_config.json", 1_156_999, None), ("tokenizer.model", 4_689_074, None),
             ("generation_config.json", 200, None), ("special_tokens_map.json", 700, None),
             *((f"model-{i:05d}.safetensors", 4_000_000_000, 90_000) for i in range(12))]
    check_files(gemma, gguf=False)
    check_files([("model.gguf", 17_000_000_000, 20 * MiB), ("config.json", 900, None),
                 ("tokenizer.json", 33 * MiB, None)], gguf=True)
    check_files([(f"model-{i:05d}-of-00191.safetensors", 4_000_000_000, 120_000) for i in range(191)], gguf=False)


@pytest.mark.parametrize(
    ("files", "gguf", "match"),
    [
        # each named small file has its cap, whatever else the manifest says about it
        ([("config.json", 101, None)], False, r"config\.json is 101 bytes; a config\.json may have 100 bytes"),
        ([("sub/config.json", 101, None)], False, r"sub/config\.json is 101 bytes"),
        ([("config.json", 101, 10)], False, r"config\.json is 101 bytes"),
        ([("tokenizer.json", 1001, None)], False, r"a tokenizer\.json may have 1000 bytes"),
        # any other small file: the general cap
        ([("LICENSE", 501, None)], False, r"LICENSE is 501 bytes; a small file may have 500 bytes"),
        # a weight file's header, by format
        ([("w.safetensors", 10**9, 301)], False, r"w\.safetensors has a header of 301 bytes; a safetensors header"),
        ([("model.gguf", 10**9, 401)], True, r"model\.gguf has a header of 401 bytes; a GGUF header may have 400"),
        # all of them together
        ([("a.txt", 500, None), ("b.txt", 500, None), ("w.safetensors", 10**9, 300), ("x.gguf", 10**9, 201)],
         False, r"small files and weight headers are 1501 bytes together"),
    ],
)
def test_each_kind_of_file_has_its_cap(files: list[tuple[str, int, int | None]], gguf: bool, match: str) -> None:
    with pytest.raises(ModelTooLarge, match=match):
        check_files(files, gguf=gguf, limits=SMALL)
    check_files([(p, min(s, 100), d if d is None else min(d, 200)) for p, s, d in files[:1]], gguf=gguf,
                limits=SMALL)


def test_a_manifest_is_checked_before_anything_is_fetched() -> None:
    """The measured attacks: a 192 MiB config.json, a GGUF whose header is 120 MiB."""
    config = ManifestFile("config.json", 192 * MiB, ("0" * 64,) * 3)
    with pytest.raises(ModelTooLarge, match=r"config\.json is 192\.0 MiB; a config\.json may have 1\.0 MiB"):
        check_model(build_manifest([config], [], piece_size=BIG_PIECE))
    gguf = ManifestFile("sha256-abc", 10 * 2**30, ("0" * 64,) * 160, data_start=120 * MiB)
    manifest = build_manifest([ManifestFile("config.json", 900, ("0" * 64,)), gguf], [], piece_size=BIG_PIECE,
                              summary={"format": "gguf"})
    with pytest.raises(ModelTooLarge, match=r"sha256-abc has a header of 120\.0 MiB; a GGUF header may have 64\.1 MiB"):
        check_model(manifest)
    assert DEFAULT_LIMITS.safetensors_header < 120 * MiB  # nor as a safetensors one
