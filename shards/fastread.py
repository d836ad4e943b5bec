"""A lean reader for our own shards: tar headers and .npy headers parsed by hand, arrays as
zero-copy views of the bytes already in memory.

Why: in Python, decoding (tarfile's per-member objects, np.load's file protocol) costs
far more than reading the bytes. Our shards are plain ustar written by
``shards.format`` (no long names, no pax headers), so a header is 512 bytes with the
name at 0..100 and the octal size at 124..136. Anything else is rejected as corrupt
rather than guessed at; a checksum mismatch in a header is too. Still no pickle: only
.npy with a plain dtype and .json are accepted.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterator

import numpy as np

from shards.format import Sample

BLOCK = 512
_NPY_MAGIC = b"\x93NUMPY"
# the header numpy writes for a plain dtype; parsed with a regex because ast.literal_eval
# (compile + walk) was 40% of decoding. Anything else falls back to ast.literal_eval.
_NPY_HEADER = re.compile(r"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \}\s*$")


class CorruptShard(ValueError):
    pass


def _header_checksum_ok(h: memoryview) -> bool:
    stored = bytes(h[148:156]).split(b"\0", 1)[0].strip()
    if not stored:
        return False
    total = sum(h[:148]) + sum(h[156:512]) + 8 * 32
    try:
        return total == int(stored, 8)
    except ValueError:
        return False


def iter_members(buf: bytes | memoryview) -> Iterator[tuple[str, memoryview]]:
    """(name, data view) of each regular member of a ustar byte string (whole or a fragment)."""
    mv = memoryview(buf)
    pos, n = 0, len(mv)
    while pos + BLOCK <= n:
        h = mv[pos:pos + BLOCK]
        if not any(h):  # end-of-archive marker
            return
        if not _header_checksum_ok(h):
            raise CorruptShard(f"bad tar header checksum at byte {pos}")
        name = bytes(h[0:100]).split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = bytes(h[345:500]).split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
        size = int(bytes(h[124:136]).split(b"\0", 1)[0].strip() or b"0", 8)
        kind = h[156:157].tobytes()
        start = pos + BLOCK
        if start + size > n:
            raise CorruptShard(f"member {name} runs past the end of the data ({start + size} > {n})")
        if kind in (b"0", b"\0"):
            yield name, mv[start:start + size]
        pos = start + (size + BLOCK - 1) // BLOCK * BLOCK


def npy_view(data: memoryview) -> np.ndarray:
    """A read-only array viewing .npy bytes (no copy); version 1-3 headers, no object dtype."""
    if bytes(data[:6]) != _NPY_MAGIC:
        raise CorruptShard("not an .npy member")
    major = data[6]
    if major == 1:
        hlen, off = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        hlen, off = int.from_bytes(data[8:12], "little"), 12
    else:
        raise CorruptShard(f"unknown .npy version {major}")
    text = bytes(data[off:off + hlen]).decode("latin1")
    m = _NPY_HEADER.match(text)
    if m:
        descr, fortran = m.group(1), m.group(2) == "True"
        shape = tuple(int(x) for x in m.group(3).replace(" ", "").split(",") if x)
    else:
        try:
            header = ast.literal_eval(text)
            descr, fortran, shape = header["descr"], bool(header.get("fortran_order")), tuple(header["shape"])
        except (ValueError, SyntaxError, KeyError, TypeError) as exc:
            raise CorruptShard(f"bad .npy header ({exc})") from None
    dtype = np.dtype(descr)
    if dtype.hasobject:
        raise CorruptShard("object arrays are refused (they would need pickle)")
    count = math.prod(shape)
    start = off + hlen
    if len(data) - start != count * dtype.itemsize:
        raise CorruptShard(f".npy data holds {len(data) - start} bytes, header says {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def iter_samples(buf: bytes | memoryview) -> Iterator[Sample]:
    """Decoded samples of a shard (or of one sample's byte range), grouped by key in order."""
    key, meta, arrays = None, None, {}
    for name, data in iter_members(buf):
        base = name.rsplit("/", 1)[-1]
        k, _, suffix = base.partition(".")
        if k != key and key is not None:
            yield _finish(key, meta, arrays)
            meta, arrays = None, {}
        key = k
        if suffix == "json":
            try:
                meta = json.loads(bytes(data))
            except ValueError as exc:
                raise CorruptShard(f"sample {k}: bad JSON ({exc})") from None
        elif suffix.endswith(".npy"):
            arrays[suffix[:-4]] = npy_view(data)
        else:
            raise CorruptShard(f"sample {k}: unexpected member .{suffix}")
    if key is not None:
        yield _finish(key, meta, arrays)


def _finish(key: str, meta: dict | None, arrays: dict) -> Sample:
    if meta is None:
        raise CorruptShard(f"sample {key}: no .json member")
    return Sample(key=key, meta=meta, arrays=arrays)
