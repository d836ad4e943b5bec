"""``python -m ingest allen``: download Allen Visual Coding sessions (OPhys or Neuropixels) by id or by the papers' selection.

Why a subprocess: allensdk 2.16.2 pins numpy<1.24, pandas 1.5 and pynwb 2.8, so it cannot live in
the main environment (numpy 2, pynwb 4). It gets its own, ``.venv-allen`` (``make allen-env``),
and this module runs a small script there. The script really calls allensdk:
``BrainObservatoryCache.get_ophys_experiment_data`` (NWB 1.0.5 2P experiments) or
``EcephysProjectCache.get_session_data`` (Neuropixels NWB 2 sessions).

Files are downloaded into a temporary folder next to ``--out`` and moved into ``--out`` only when
every download succeeded, so a failure (no network, server error, interrupted run) leaves
nothing partial behind. Without network the command fails fast with one line, e.g.
``error: cannot reach api.brain-map.org: [Errno -2] Name or service not known``.

The papers' selection (``--select-papers``): the five areas VISp, VISl, VISal, VISam, VISpm in
equal proportions, ``--per-region`` each. OPhys: per area, experiment containers by increasing id,
taking their ``three_session_A`` (drifting gratings) and ``three_session_B`` (static gratings,
natural scenes) experiments in turn. EPhys: per area, ``brain_observatory_1.1`` sessions (all three
tasks) that record it, by increasing id, each session counted once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENV = REPO / ".venv-allen"
DEFAULT_HOST = "api.brain-map.org"
PAPER_REGIONS = ("VISp", "VISl", "VISal", "VISam", "VISpm")

#: Run inside .venv-allen as ``python -c SCRIPT '<json args>'``; prints one JSON object on its last line.
SCRIPT = r'''
import json, os, socket, sys, warnings
warnings.simplefilter("ignore")
a = json.loads(sys.argv[1])

def done(obj, code=0):
    print(json.dumps(obj)); sys.stdout.flush(); sys.exit(code)

def first_line(exc):
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]

host, _, port = a["host"].partition(":")
try:
    socket.create_connection((host, int(port or (443 if a["scheme"] == "https" else 80))), timeout=a["timeout"]).close()
except OSError as exc:
    done({"error": "cannot reach %s: %s" % (a["host"], first_line(exc))}, 3)

try:
    if a["modality"] == "ophys":
        from allensdk.core.brain_observatory_cache import BrainObservatoryCache
    else:
        from allensdk.brain_observatory.ecephys.ecephys_project_cache import EcephysProjectCache
except Exception as exc:
    done({"error": "allensdk is not importable in %s: %s" % (sys.executable, first_line(exc))}, 2)

work = a["work"]
manifest = os.path.join(work, "manifest.json")
files, ids = [], list(a["ids"])
try:
    if a["modality"] == "ophys":
        boc = BrainObservatoryCache(manifest_file=manifest, base_uri="%s://%s" % (a["scheme"], a["host"]))
        if a["select"]:
            ids = []
            for region in a["regions"]:
                exps = boc.get_ophys_experiments(targeted_structures=[region],
                                                 session_types=["three_session_A", "three_session_B"])
                by_container = {}
                for e in sorted(exps, key=lambda e: (e["experiment_container_id"], e["session_type"])):
                    by_container.setdefault(e["experiment_container_id"], []).append(e["id"])
                picked = [i for c in sorted(by_container) for i in by_container[c]][: a["per_region"]]
                ids += picked
        if not a["dry_run"]:
            for i in ids:
                ds = boc.get_ophys_experiment_data(int(i))
                files.append({"id": int(i), "path": ds.nwb_file, "name": "ophys_experiment_%d.nwb" % int(i)})
    else:
        cache = EcephysProjectCache.from_warehouse(scheme=a["scheme"], host=a["host"], manifest=manifest,
                                                   timeout=a["http_timeout"])
        if a["select"]:
            table = cache.get_session_table()
            table = table[table["session_type"] == "brain_observatory_1.1"].sort_index()
            ids, seen = [], set()
            for region in a["regions"]:
                has = [int(s) for s, acr in table["ecephys_structure_acronyms"].items() if region in list(acr)]
                picked = [s for s in has if s not in seen][: a["per_region"]]
                seen.update(picked)
                ids += picked
        if not a["dry_run"]:
            for i in ids:
                cache.get_session_data(int(i))
                path = os.path.join(work, "session_%d" % int(i), "session_%d.nwb" % int(i))
                files.append({"id": int(i), "path": path, "name": "session_%d.nwb" % int(i)})
except Exception as exc:
    import urllib.error
    import requests
    if isinstance(exc, (urllib.error.HTTPError, requests.HTTPError, ValueError)):  # reached, but a bad answer
        done({"error": "the Allen API at %s answered with an error: %s" % (a["host"], first_line(exc))}, 4)
    if isinstance(exc, (urllib.error.URLError, requests.ConnectionError, requests.Timeout, ConnectionError,
                        TimeoutError, socket.timeout)):
        done({"error": "cannot reach %s: %s" % (a["host"], first_line(exc))}, 3)
    done({"error": "allensdk failed (%s): %s" % (type(exc).__name__, first_line(exc))}, 4)
done({"ids": [int(i) for i in ids], "files": files})
'''


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _parse_ids(values: list[str]) -> list[int]:
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            out.append(int(part))
    return out


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ingest allen", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Download Allen Visual Coding sessions with allensdk (run in its own "
                                            "environment, see `make allen-env`). Needs internet access.")
    p.add_argument("--ids", nargs="*", default=[], help="OPhys experiment ids or Neuropixels session ids (space/comma separated)")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="folder the NWB files are moved into when every download succeeded")
    p.add_argument("--modality", choices=("ophys", "ephys"), default="ophys", help="what the ids are")
    p.add_argument("--select-papers", action="store_true",
                   help="pick sessions like the papers: the five areas in equal proportions (ignores --ids)")
    p.add_argument("--per-region", type=int, default=2, help="sessions per area with --select-papers")
    p.add_argument("--regions", default=",".join(PAPER_REGIONS), help="areas for --select-papers")
    p.add_argument("--dry-run", action="store_true", help="resolve and print the ids, download nothing")
    p.add_argument("--allen-env", type=Path, default=DEFAULT_ENV, help="virtual environment with allensdk==2.16.2")
    p.add_argument("--host", default=DEFAULT_HOST, help="Allen API host[:port]")
    p.add_argument("--scheme", default="http", choices=("http", "https"), help="Allen API scheme")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the first connection")
    p.add_argument("--http-timeout", type=int, default=1200, help="seconds per HTTP request (Neuropixels files are GBs)")
    a = p.parse_args(argv)

    ids = _parse_ids(a.ids)
    if not ids and not a.select_papers:
        print("error: give --ids or --select-papers", file=sys.stderr)
        return 2
    python = env_python(a.allen_env)
    if not python.exists():
        print(f"error: the allensdk environment {a.allen_env} does not exist; create it with `make allen-env` "
              f"(allensdk==2.16.2 cannot share the main environment)", file=sys.stderr)
        return 2

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.allen-download-", dir=out.parent))
    try:
        args = {"ids": ids, "modality": a.modality, "select": a.select_papers, "per_region": a.per_region,
                "regions": [r.strip() for r in a.regions.split(",") if r.strip()], "dry_run": a.dry_run,
                "host": a.host, "scheme": a.scheme, "timeout": a.connect_timeout, "http_timeout": a.http_timeout,
                "work": str(work)}
        proc = subprocess.run([str(python), "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
                              cwd=work)
        result = _last_json(proc.stdout)
        if proc.returncode != 0 or result is None or "error" in result:
            reason = (result or {}).get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"error: {reason}", file=sys.stderr)
            return proc.returncode if proc.returncode not in (0, None) else 1
        if not result["ids"]:
            print("error: no sessions matched the selection", file=sys.stderr)
            return 1
        if a.dry_run:
            print(f"{a.modality} ids: {' '.join(str(i) for i in result['ids'])}")
            return 0
        missing = [f["path"] for f in result["files"] if not Path(f["path"]).is_file()]
        if missing:
            print(f"error: allensdk reported success but these files are missing: {', '.join(missing)}", file=sys.stderr)
            return 1
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for f in result["files"]:
            dest = out / f["name"]
            shutil.move(f["path"], dest)
            rows.append((dest.name, a.modality, str(f["id"]), f"{dest.stat().st_size / 1e6:.1f}"))
        _print_table(rows)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    head = ("file", "modality", "id", "MB")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"{len(rows)} files downloaded")
