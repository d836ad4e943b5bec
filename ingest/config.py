"""The settings a store is ingested with, and the check that a rerun uses the same ones.

They shape every shard (chunk length, shard size, the split by time), so a store holds one set:
the first run writes them to ``_ingest/config.json`` and a rerun with others is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from ingest.splits import SplitConfig
from shards.store import Store

CONFIG = "_ingest/config.json"


@dataclass(frozen=True)
class IngestConfig:
    chunk_s: float = 10.0
    shard_bytes: int = 64 << 20
    split: SplitConfig = field(default_factory=SplitConfig)

    def to_json(self) -> dict:
        d = asdict(self)
        d["split"]["fractions"] = list(d["split"]["fractions"])
        return d


def check_config(store: Store, config: IngestConfig) -> None:
    """Record ``config`` in a new store; refuse (ValueError) a store written with other settings."""
    want = config.to_json()
    if store.exists(CONFIG):
        have = json.loads(store.read_bytes(CONFIG))
        if have != want:
            raise ValueError(
                f"{store.url(CONFIG)}: this store was ingested with different settings {have}; "
                f"use a new --out (or the same settings) so shards stay consistent"
            )
    else:
        store.write_bytes(CONFIG, json.dumps(want, sort_keys=True).encode())
