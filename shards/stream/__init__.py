"""Shards -> windows -> packed batches. Top to bottom: ``report`` (what a mixture realises), ``loader``
(the DataLoader and its resumable state), ``dataset`` (the IterableDataset: planned windows -> packed
batches), ``wire`` (how DataLoader workers hand batches over), ``plan`` (the epoch plan as plain arrays,
pure functions), ``fetch`` (reading shard bytes from a store: retries, read-ahead, cache),
``integrity`` (checksums, decoding), ``tokens`` (a chunk's window -> tokens; packing), ``mixture``
(selectors and their weights). docs/stream.md."""
