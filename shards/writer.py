"""Write one record's samples into ``{modality}/{region}/{session}/{split}-{NNNNN}.tar`` shards.

Each shard is built in a temp file, hashed, and only then published under its
final name (rename locally, one whole PUT on S3): a shard that is visible is
complete. The writer returns the manifest and chunk rows of what it published.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from shards.format import Sample, TarSampleWriter
from shards.store import Store


def shard_dir(modality: str, region: str, session_id: str) -> str:
    return f"{modality}/{region}/{session_id}"


def sha256_file(path: str, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Open:
    tmp: str
    fileobj: object
    tar: TarSampleWriter
    rows: list[dict] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)


class RecordShardWriter:
    """Rolls a new shard per split whenever the current one reaches ``target_bytes``."""

    def __init__(self, store: Store, modality: str, region: str, session_id: str, target_bytes: int = 64 << 20):
        self.store = store
        self.modality, self.region, self.session_id = modality, region, session_id
        self.dir = shard_dir(modality, region, session_id)
        self.target_bytes = target_bytes
        self._open: dict[str, _Open] = {}
        self._count: dict[str, int] = {}
        self.shard_rows: list[dict] = []
        self.chunk_rows: list[dict] = []

    def add(self, split: str, sample: Sample) -> None:
        cur = self._open.get(split)
        if cur is None:
            tmp = self.store.new_local_file()
            fileobj = open(tmp, "wb")
            cur = self._open[split] = _Open(tmp, fileobj, TarSampleWriter(fileobj))
        start, end = cur.tar.write(sample)
        m = sample.meta
        n_events = len(sample.arrays.get("spike_times", sample.arrays.get("frame_times", [])))
        n_queries = sum(1 for lab in m["stimuli"]["label"] if lab >= 0)
        cur.spans.append((m["t_start"], m["t_end"]))
        row = (
            {
                "path": None,  # filled when the shard is published
                "key": sample.key,
                "session_id": self.session_id,
                "modality": self.modality,
                "region": self.region,
                "split": split,
                "t_start": m["t_start"],
                "t_end": m["t_end"],
                "offset": start,
                "length": end - start,
                "n_units": len(m["units"]),
                "n_events": n_events,
                "n_queries": n_queries,
                "xxh3": cur.tar.checksums[-1],  # of bytes [offset, offset + length): shards/stream/integrity.py
            }
        )
        cur.rows.append(row)
        self.chunk_rows.append(row)
        if end >= self.target_bytes:
            self._publish(split)

    def _publish(self, split: str) -> None:
        cur = self._open.pop(split)
        cur.tar.close()
        cur.fileobj.close()  # type: ignore[attr-defined]
        idx = self._count.get(split, 0)
        self._count[split] = idx + 1
        rel = f"{self.dir}/{split}-{idx:05d}.tar"
        n_bytes = os.path.getsize(cur.tmp)
        digest = cur.tar.hexdigest()
        self.store.put_file(cur.tmp, rel)
        if os.path.exists(cur.tmp):
            os.remove(cur.tmp)
        for row in cur.rows:
            row["path"] = rel
        self.shard_rows.append(
            {
                "path": rel,
                "modality": self.modality,
                "region": self.region,
                "session_id": self.session_id,
                "split": split,
                "n_samples": len(cur.rows),
                "n_bytes": n_bytes,
                "sha256": digest,
                "t_start": min(a for a, _ in cur.spans),
                "t_end": max(b for _, b in cur.spans),
            }
        )

    def close(self) -> None:
        for split in sorted(self._open):
            self._publish(split)

    def abort(self) -> None:
        for cur in self._open.values():
            cur.fileobj.close()  # type: ignore[attr-defined]
            if os.path.exists(cur.tmp):
                os.remove(cur.tmp)
        self._open.clear()
