"""A shard store: a local folder or ``s3://bucket/prefix``, written atomically.

Readers must never see half an object. Locally every write goes to a hidden
``.tmp/`` folder inside the store (same filesystem) and is renamed into place;
on S3 an object is uploaded whole in one PUT, which S3 makes visible
atomically. A killed writer therefore leaves at worst files under ``.tmp/``,
which no reader lists and the next writer removes.

The S3 endpoint comes from ``AWS_ENDPOINT_URL`` (as botocore reads it), so a
local S3-compatible server works without any flag.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import fsspec

TMP_DIR = ".tmp"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_filesystem() -> fsspec.AbstractFileSystem:
    """An s3fs filesystem honouring AWS_ENDPOINT_URL, without listing caches (stale listings
    would make a rerun think an object is missing or present)."""
    kwargs: dict = {"use_listings_cache": False, "skip_instance_cache": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return fsspec.filesystem("s3", **kwargs)


class Store:
    """Paths inside a store are relative POSIX strings (``ephys/VISp/s1/train-00000.tar``)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.remote = is_remote(uri)
        if self.remote:
            if not uri.startswith("s3://"):
                raise ValueError(f"unsupported store URI {uri!r}: use a local folder or s3://bucket/prefix")
            self.fs = s3_filesystem()
            self.root = self.uri[len("s3://"):]
        else:
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(uri.removeprefix("file://")).resolve())

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, rel: str) -> str:
        """The filesystem path (s3fs: 'bucket/key') of a store-relative path."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str) -> str:
        return f"s3://{self.path(rel)}" if self.remote else self.path(rel)

    # ---- reads -------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def list(self, rel_dir: str = "", suffix: str = "") -> list[str]:
        """Store-relative paths of files under rel_dir (recursive), hidden temp files excluded."""
        base = self.path(rel_dir)
        if not self.fs.exists(base):
            return []
        out = []
        prefix = self.root + "/"
        for p in self.fs.find(base):
            rel = p[len(prefix):] if p.startswith(prefix) else p
            if rel.startswith(TMP_DIR + "/") or not rel.endswith(suffix):
                continue
            out.append(rel)
        return sorted(out)

    # ---- atomic writes -----------------------------------------------------------------------
    def _local_tmp(self) -> str:
        tmp_dir = os.path.join(self.root, TMP_DIR)
        os.makedirs(tmp_dir, exist_ok=True)
        return os.path.join(tmp_dir, uuid.uuid4().hex)

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self.path(rel), data)
            return
        tmp = self._local_tmp()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._publish_local(tmp, rel)

    def put_file(self, local_path: str, rel: str) -> None:
        """Publish a finished local file under rel (moved, not copied, when local)."""
        if self.remote:
            self.fs.put_file(local_path, self.path(rel))
            return
        if os.path.dirname(os.path.abspath(local_path)) != os.path.join(self.root, TMP_DIR):
            tmp = self._local_tmp()
            shutil.copyfile(local_path, tmp)
            local_path = tmp
        self._publish_local(local_path, rel)

    def new_local_file(self) -> str:
        """A temp path to build a file in before publishing it: inside the store when local
        (so publishing is a rename), in the system temp dir when remote."""
        if self.remote:
            import tempfile

            fd, path = tempfile.mkstemp(prefix="shard-", suffix=".tmp")
            os.close(fd)
            return path
        return self._local_tmp()

    def _publish_local(self, tmp: str, rel: str) -> None:
        dest = self.path(rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(tmp, dest)

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel))

    def clean_tmp(self) -> None:
        """Remove what killed writers left under .tmp/ (local stores only; S3 has none)."""
        if not self.remote:
            shutil.rmtree(os.path.join(self.root, TMP_DIR), ignore_errors=True)
