"""Per-sample checksums: written at ingest into ``chunks.parquet``, checked by the stream on every read.

Each row of ``chunks.parquet`` carries ``xxh3``: the XXH3-64 digest (seed 0, 16 lowercase hex
digits) of the sample's bytes in its shard, ``[offset, offset + length)``: exactly the bytes one
ranged read returns, tar headers and padding included. The stream checks it before decoding, so
bytes that changed after ingest (a flipped bit on disk, a shard rewritten by hand, a proxy that
serves other bytes) are a corrupt sample naming the shard, even when the change still decodes.

Why XXH3 and not crc32 or sha256: the check runs on every chunk the stream decodes, and our lean
decoder handles ~0.9 GB/s of chunks per core; zlib's crc32 runs at 1.8-3.8 GB/s on this host
(25-50% of the decode time), sha256 below 1 GB/s, XXH3-64 at ~29 GB/s (about 3%; measured in
``bench/stream.py --only checksum``). It detects accidental corruption, not tampering (the shard
sha256 in the manifest, checked by ``shards verify``, is the strong one).

A store written before this column existed (no ``xxh3`` column, or null values in it) still
reads: those samples are read unchecked, and the stream says so once.
"""

from __future__ import annotations

import xxhash

from shards.fastread import iter_samples
from shards.stream.tokens import DecodedChunk, Vocab

COLUMN = "xxh3"


def checksum(data: bytes | memoryview) -> str:
    """The ``xxh3`` value of a sample's bytes (16 hex digits)."""
    return xxhash.xxh3_64_hexdigest(data)


class ChecksumMismatch(ValueError):
    pass


def decode_chunk(data: bytes | memoryview, key: str, vocab: Vocab, expected: str | None = None) -> DecodedChunk:
    """One sample's bytes -> DecodedChunk, exactly as the stream does it: the checksum (when
    ``expected`` is given), the lean tar/.npy reader, one sample whose key is ``key``, its units and
    record known to the store's tables. Raises (ChecksumMismatch, CorruptShard, ValueError, ...)
    on anything else."""
    if expected:
        got = checksum(data)
        if got != expected:
            raise ChecksumMismatch(f"xxh3 {got} of its {len(data)} bytes differs from chunks.parquet's {expected}")
    samples = list(iter_samples(data))
    if len(samples) != 1 or samples[0].key != key:
        found = ", ".join(s.key for s in samples[:3]) or "none"
        raise ValueError(f"the bytes are not sample {key} (found {len(samples)} samples: {found})")
    return DecodedChunk.from_sample(samples[0], vocab)
