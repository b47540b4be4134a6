"""Bucket sizes: every shape a compiled step sees is rounded to one of a few sizes.

Owns the rounding rules shared by the host side (model.py, runner.py) and the memory
accounting: power-of-two buckets, half-octave buckets (attention's keys), prefill chunk spans aligned to absolute positions, and
the decode width (rows a decode step computes). A new bucket is a new compilation, so
these few functions decide how many compilations a model needs; no JAX here.
"""

from __future__ import annotations

MIN_BUCKET = 16  # smallest padded prefill chunk


def pow2_bucket(n: int, *, floor: int = 1, cap: int | None = None) -> int:
    """The smallest power of two >= n and >= floor (itself a power of two), at most cap.

    Padding sizes to these buckets keeps the number of compilations logarithmic.
    """
    size = floor
    while size < n:
        size *= 2
    return size if cap is None else min(size, cap)


def half_octave_bucket(n: int, *, floor: int) -> int:
    """The smallest of 2^k and 1.5 * 2^k that is >= n and >= floor (a power of two >= 2).

    Twice the buckets of pow2_bucket for half the padding at worst: where attention's
    key walk is the cost, a step just past a power of two pays 1.5x its keys, not 2x.
    Every bucket above floor is a multiple of floor / 2.
    """
    size = floor
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def chunk_spans(start: int, n: int, chunk: int) -> list[tuple[int, int]]:
    """Absolute [begin, end) spans of the prefill chunks for n tokens from position start.

    Boundaries sit at multiples of `chunk` in absolute positions, not relative to the call,
    so a prompt prefilled in one call or in several calls split at multiples of `chunk`
    (interleaved with decode steps) runs exactly the same chunks: the same compiled
    shapes, hence the same bits (see the replay conditions in node/engine/__init__.py).
    """
    spans = []
    pos, end = start, start + n
    while pos < end:
        stop = min(end, (pos // chunk + 1) * chunk)
        spans.append((pos, stop))
        pos = stop
    return spans


def decode_width(rows: int) -> int:
    """Rows a decode step computes for `rows` requested slots: the power-of-two bucket.

    A session's numbers depend on this width (matmul kernels differ by row count), never
    on what the other rows hold; replay at the width the session was decoded at.
    """
    return pow2_bucket(max(rows, 1))
