"""Which sources a run ingests: every ``*.nwb`` under a folder, one file, or an S3 prefix.

Each source gets a session id that is a safe path component and unique in the listing; ``*.nwb``
entries that are not files are reported, never silently skipped.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ingest.regions import safe_component
from shards.store import Store, is_remote


@dataclass
class Source:
    uri: str  # local path or s3://...
    session_id: str


def _not_a_file(p: Path) -> str:
    """Why a ``*.nwb`` entry that is not a regular file cannot be ingested (one line)."""
    if p.is_symlink() and not p.exists():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"broken symlink (points to {target}, which does not exist)"
    if p.is_dir():
        return "a directory named *.nwb, not an NWB file"
    return "not a regular file"


def _listing(src: str, problems: list[dict] | None) -> tuple[list[str], list[str]]:
    """(URIs, paths relative to src) of the sources under src, sorted."""
    if is_remote(src):
        store = Store(src)
        uris = [store.url(rel) for rel in store.list("", ".nwb")]
        if not uris:
            store.check()  # no such bucket / access denied, rather than "no .nwb files"
        return uris, [u[len(store.url("")) + 1:] for u in uris]
    root = Path(src)
    if root.is_file():
        return [str(root.resolve())], [root.name]
    if not root.is_dir():
        raise FileNotFoundError(f"{src}: no such file or directory")
    found = sorted(root.rglob("*.nwb"))
    files = [p for p in found if p.is_file()]
    if problems is not None:
        problems += [{"file": str(p.absolute()), "reason": _not_a_file(p)} for p in found if not p.is_file()]
    return [str(p.resolve()) for p in files], [str(p.relative_to(root)) for p in files]


def discover(src: str, problems: list[dict] | None = None) -> list[Source]:
    """Every ``*.nwb`` under src (sorted), each with a session id that is a safe path component
    and unique in this listing (duplicated stems get a short hash of their relative path).

    ``*.nwb`` entries that are not files (directories, broken symlinks) are not sources; when
    ``problems`` is given, each is appended to it as ``{"file", "reason"}`` (the run reports them
    as failed files)."""
    uris, rels = _listing(src, problems)
    ids = [safe_component(Path(r).stem) for r in rels]
    counts = Counter(ids)
    out = []
    for uri, rel, sid in zip(uris, rels, ids):
        if counts[sid] > 1:
            sid = f"{sid}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        out.append(Source(uri, sid))
    return out
