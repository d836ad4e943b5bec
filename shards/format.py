"""The sample format inside a shard, shared by the writer (ingest) and the readers.

A sample is one chunk: ``<key>.json`` plus ``<key>.<array>.npy`` members, written
as plain ustar entries with fixed metadata (mtime 0, uid 0, mode 0644) so the
same input always gives byte-identical shards (and equal sha256 on a rerun).
Stock ``webdataset`` reads them; every array loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

EPHYS_ARRAYS = ("spike_times", "spike_units")
OPHYS_ARRAYS = ("frame_times", "dff")
FORMAT_VERSION = 1
BLOCKSIZE = 512


@dataclass
class Sample:
    """One chunk of one record: metadata (JSON-able) and named numpy arrays."""

    key: str
    meta: dict
    arrays: dict[str, np.ndarray]


def encode_npy(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        raise TypeError("object arrays would need pickle; refusing to write one")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def members(sample: Sample) -> list[tuple[str, bytes]]:
    """Tar members of a sample, JSON first (readers can route on metadata before arrays)."""
    out = [(f"{sample.key}.json", json.dumps(sample.meta, separators=(",", ":"), sort_keys=True).encode())]
    for name in sorted(sample.arrays):
        out.append((f"{sample.key}.{name}.npy", encode_npy(sample.arrays[name])))
    return out


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile would write for a member with our fixed metadata,
    built directly (tarfile's per-member objects cost more than the data copy for small members)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:  # needs ustar's prefix field: let tarfile do it
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(512)
    h[0:len(raw)] = raw
    h[100:156] = b"0000644\x000000000\x000000000\x00%011o\x0000000000000\x00" % size + b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


class TarSampleWriter:
    """Appends samples to an open binary file as a tar (the bytes tarfile would write); records
    each sample's byte range, so a reader can fetch one sample with a single ranged GET.
    The sha256 of everything written is kept as it goes (the manifest needs it, and reading
    the shard back to hash it would cost another pass over its bytes), and so is each sample's
    XXH3-64 (``checksums``, parallel to ``offsets``: the ``xxh3`` column of chunks.parquet,
    ``shards/stream/integrity.py``)."""

    def __init__(self, fileobj):
        self._f = fileobj
        self._hash = hashlib.sha256()
        self.offset = 0
        self.offsets: list[tuple[int, int]] = []
        self.checksums: list[str] = []

    def write(self, sample: Sample) -> tuple[int, int]:
        start = self.offset
        parts = []
        for name, data in members(sample):
            parts += [tar_header(name, len(data)), data, b"\0" * (-len(data) % BLOCKSIZE)]
        blob = b"".join(parts)
        self._f.write(blob)
        self._hash.update(blob)
        self.checksums.append(xxhash.xxh3_64_hexdigest(blob))
        self.offset += len(blob)
        self.offsets.append((start, self.offset))
        return start, self.offset

    def close(self) -> None:
        end = self.offset + 2 * BLOCKSIZE  # end-of-archive, then padding to a whole record, as tarfile does
        tail = b"\0" * (2 * BLOCKSIZE + (-end % tarfile.RECORDSIZE))
        self._f.write(tail)
        self._hash.update(tail)

    def hexdigest(self) -> str:
        """sha256 of the bytes written so far (after close: of the whole shard)."""
        return self._hash.hexdigest()


def split_member_name(name: str) -> tuple[str, str]:
    """``key.suffix`` as webdataset splits it: key up to the first dot of the basename."""
    base = name.rsplit("/", 1)[-1]
    key, _, suffix = base.partition(".")
    return key, suffix


def iter_tar_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members into samples by key, in order (raw bytes, nothing decoded)."""
    current: str | None = None
    group: dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, suffix = split_member_name(info.name)
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if key != current and group:
                yield current, group  # type: ignore[misc]
                group = {}
            current = key
            group[suffix] = data
    if group:
        yield current, group  # type: ignore[misc]


def decode_sample(key: str, group: dict[str, bytes]) -> Sample:
    """Decode one sample's raw members (JSON + .npy only; anything else is an error)."""
    if "json" not in group:
        raise ValueError(f"sample {key}: no .json member")
    meta = json.loads(group["json"])
    arrays = {}
    for suffix, data in group.items():
        if suffix == "json":
            continue
        if not suffix.endswith(".npy"):
            raise ValueError(f"sample {key}: unexpected member .{suffix}")
        arrays[suffix[: -len(".npy")]] = decode_npy(data)
    return Sample(key=key, meta=meta, arrays=arrays)

