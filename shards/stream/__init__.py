"""Shards -> windows -> packed batches: ``mixture`` (selectors and their weights), ``plan`` (the epoch
plan as plain arrays, pure functions), ``tokens`` (a chunk's window -> tokens; packing), ``fetch``
(reading shard bytes from a store: retries, read-ahead, cache), ``dataset`` (the IterableDataset and
its loader), ``report`` (what a mixture realises)."""
