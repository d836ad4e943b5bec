"""``python -m ingest {synth,run,allen}``: the ingest command line."""

from __future__ import annotations

import argparse
import sys


def _run(argv: list[str]) -> int:
    from ingest.config import IngestConfig
    from ingest.run import run_ingest
    from ingest.splits import SplitConfig
    from ingest.summary import format_summary

    p = argparse.ArgumentParser(prog="python -m ingest run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="NWB files -> WebDataset shards + Parquet tables, one Ray task per file. "
                                            "Exit 1 if any file failed; a rerun resumes.")
    p.add_argument("--src", required=True, help="folder (searched recursively for *.nwb), one .nwb file, or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="store: local folder or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)")
    p.add_argument("--workers", type=int, default=2, help="parallel Ray tasks (local cluster CPUs)")
    p.add_argument("--chunk-s", type=float, default=10.0, help="seconds per sample (chunk)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 60/10/30 split by time")
    p.add_argument("--split-block-s", type=float, default=10.0, help="block length the splits are drawn in")
    p.add_argument("--rehash", action="store_true",
                   help="hash every source to decide what is done (default: a source whose size and mtime, or S3 "
                        "ETag, match its marker is not read again)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    config = IngestConfig(chunk_s=a.chunk_s, shard_bytes=int(a.shard_mb * (1 << 20)),
                          split=SplitConfig(seed=a.split_seed, block_s=a.split_block_s))
    try:
        summary = run_ingest(a.src, a.out, workers=a.workers, config=config, progress=not a.quiet,
                             rehash=a.rehash)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary, a.out))
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"synth": "write a synthetic Allen-like NWB corpus (--preset science: the benchmark corpus)",
                "run": "ingest NWB files into a shard store",
                "allen": "download Allen sessions (needs `make allen-env` and internet)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m ingest {synth,run,allen} [options]   (each takes --help)\n")
        for k, v in commands.items():
            print(f"  {k:6} {v}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return _run(rest)
    if cmd == "synth":
        from ingest.synth.corpus import main as synth_main

        return synth_main(rest)
    from ingest.allen import main as allen_main

    return allen_main(rest)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:  # the local Ray cluster dies with this command, even on kill -9
        from cluster.lifeline import supervise

        supervise()
    sys.exit(main())
