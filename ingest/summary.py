"""What a run did: files ingested, skipped and failed, and the one-screen summary of the store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shards import manifest
from shards.store import Store

FAILURES = "_ingest/failures.json"


@dataclass
class IngestSummary:
    ok: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    tables: manifest.StoreTables | None = None
    seconds: float = 0.0
    source_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def write_failures(store: Store, summary: IngestSummary) -> None:
    """``_ingest/failures.json``: the files of this run that failed, each with its one-line reason."""
    store.write_bytes(FAILURES, json.dumps(sorted(summary.failed, key=lambda f: f["file"]), indent=1).encode())


def format_summary(summary: IngestSummary, out: str) -> str:
    """The one-screen summary: files, then sessions/units/samples/MB per modality and region."""
    t = summary.tables
    lines = [f"ingest: {len(summary.ok)} ingested, {len(summary.skipped)} already done, "
             f"{len(summary.failed)} failed in {summary.seconds:.1f} s -> {out}"]
    if t is not None and t.manifest.num_rows:
        sessions = t.sessions.to_pandas()
        shards = t.manifest.to_pandas()
        g_s = sessions.groupby(["modality", "region"]).agg(records=("session_id", "count"), units=("n_units", "sum"))
        g_m = shards.groupby(["modality", "region"]).agg(shards=("path", "count"), samples=("n_samples", "sum"),
                                                         mb=("n_bytes", lambda b: b.sum() / 1e6))
        table = g_s.join(g_m, how="outer").fillna(0)
        lines.append(f"{'modality':9} {'region':10} {'records':>7} {'units':>7} {'shards':>7} {'samples':>8} {'MB':>9}")
        for (mod, reg), r in table.iterrows():
            lines.append(f"{mod:9} {reg:10} {int(r.records):7d} {int(r.units):7d} {int(r.shards):7d} "
                         f"{int(r.samples):8d} {r.mb:9.2f}")
        tot = table.sum()
        lines.append(f"{'total':9} {'':10} {int(tot.records):7d} {int(tot.units):7d} {int(tot.shards):7d} "
                     f"{int(tot.samples):8d} {tot.mb:9.2f}")
    for f in summary.failed:
        lines.append(f"FAILED {f['file']}: {f['reason']}")
    lines += [f"note: {n}" for n in summary.notes]
    if summary.failed:
        lines.append(f"failures written to {Store(out).url(FAILURES)}")
    return "\n".join(lines)
