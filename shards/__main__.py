"""``python -m shards {ls,verify,mix}``: look at and check a shard store.

Errors are one line on stderr, exit 2: a bad argument or store, a store that cannot be reached
(``StoreUnavailable``: the endpoint and the object, after the fetcher's retry policy), a corrupt
sample in strict mode or corrupt samples over the error budget (``CorruptSampleError``)."""

from __future__ import annotations

import argparse
import sys

from shards import manifest
from shards.store import Store


def cmd_ls(store: Store) -> int:
    t = manifest.load(store)
    shards = t.manifest.to_pandas()
    sessions = t.sessions.to_pandas()
    print(f"store {store.uri}: {sessions.session_id.nunique()} sessions, {len(sessions)} records, "
          f"{t.units.num_rows} units, {len(shards)} shards, {int(shards.n_samples.sum()) if len(shards) else 0} samples, "
          f"{shards.n_bytes.sum() / 1e6 if len(shards) else 0:.1f} MB")
    if not len(shards):
        return 0
    print(f"{'modality':9} {'region':10} {'sessions':>8} {'units':>6} {'train':>6} {'valid':>6} {'test':>6} {'MB':>8}")
    per_split = shards.pivot_table(index=["modality", "region"], columns="split", values="n_samples",
                                   aggfunc="sum", fill_value=0)
    mb = shards.groupby(["modality", "region"]).n_bytes.sum() / 1e6
    recs = sessions.groupby(["modality", "region"]).agg(sessions=("session_id", "nunique"), units=("n_units", "sum"))
    for key, r in recs.iterrows():
        counts = [int(per_split.loc[key].get(s, 0)) if key in per_split.index else 0 for s in ("train", "valid", "test")]
        print(f"{key[0]:9} {key[1]:10} {int(r.sessions):8d} {int(r.units):6d} {counts[0]:6d} {counts[1]:6d} "
              f"{counts[2]:6d} {mb.get(key, 0.0):8.2f}")
    print("(train/valid/test: samples = chunks per split)")
    return 0


def cmd_verify(store: Store, a: argparse.Namespace) -> int:
    from shards.verify import verify_store

    n, problems = verify_store(store, progress=sys.stderr.isatty(), deep=a.deep)
    for p in problems:
        print(f"BAD {store.url(p.path)}: {p.reason}")
    what = "shards checked, every sample decoded" if a.deep else "shards checked"
    print(f"verify: {n} {what}, {len(problems)} problems")
    return 1 if problems else 0


def cmd_mix(store: Store, a: argparse.Namespace) -> int:
    import json

    from shards.stream.dataset import StreamConfig
    from shards.stream.report import mix_report

    config = StreamConfig(store=store.uri, mix=a.mix, batch_size=a.batch_size, seed=a.seed, window_s=a.window_s,
                          error_budget=a.error_budget, strict=a.strict)
    report = mix_report(config, a.batches, a.world_size, progress=not a.json and sys.stderr.isatty())
    if a.json:
        print(json.dumps(report))
        return 0
    print(f"{'selector':28} {'requested':>9} {'realised':>9} {'windows':>8}")
    for name, r in report["selectors"].items():
        print(f"{name:28} {r['requested']:9.4f} {r['realised']:9.4f} {r['windows']:8d}")
    t = report["tokens_per_batch"]
    print(f"batches per rank: {report['batches_per_rank']}   tokens per batch: mean {t['mean']:.0f}, max {t['max']}")
    print(f"corrupt samples skipped: {report['skipped_samples']}"
          + (f" (per rank {report['skipped_samples_per_rank']})" if len(report["skipped_samples_per_rank"]) > 1 else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards", description="Inspect and check a shard store.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("ls", "sessions/shards by modality and region"),
                       ("verify", "every shard against the manifest (exit 1 and name the bad shard)")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("store", help="local folder or s3://bucket/prefix")
        if name == "verify":
            sp.add_argument("--deep", action="store_true",
                            help="also decode every sample the way the stream does (its xxh3 checksum, the "
                                 "tar and .npy members, its units and record), naming each bad sample")
    mp = sub.add_parser("mix", help="requested vs realised mixture fractions, batches per rank, tokens per batch",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mp.add_argument("store", help="local folder or s3://bucket/prefix")
    mp.add_argument("--mix", required=True, help="selectors modality[/region[/session]]=weight, comma separated")
    mp.add_argument("--batch-size", type=int, default=32)
    mp.add_argument("--batches", type=int, default=50, help="batches per rank to draw")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--world-size", type=int, default=1)
    mp.add_argument("--window-s", type=float, default=1.0)
    mp.add_argument("--error-budget", type=float, default=0.01,
                    help="fraction of the drawn windows that may be corrupt samples (skipped and counted)")
    mp.add_argument("--strict", action="store_true", help="stop at the first corrupt sample, naming it")
    mp.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    from shards.stream.fetch import FetchError

    store = Store(a.store)
    try:
        if a.cmd == "mix":
            return cmd_mix(store, a)
        if a.cmd == "verify":
            return cmd_verify(store, a)
        return cmd_ls(store)
    except Exception as exc:
        stream = sys.modules.get("shards.stream.dataset")  # (imported by mix only: ls and verify stay torch-free)
        if isinstance(exc, (ValueError, FileNotFoundError, FetchError)) or (
                stream is not None and isinstance(exc, stream.CorruptSampleError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
