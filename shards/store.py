"""A shard store: a local folder or ``s3://bucket/prefix``, written atomically.

Readers must never see half an object. Locally every write goes to a hidden
``.tmp/`` folder inside the store (same filesystem) and is renamed into place;
on S3 an object is uploaded whole in one PUT, which S3 makes visible
atomically. A killed writer therefore leaves at worst files under ``.tmp/``,
which no reader lists and the next writer removes.

The S3 endpoint comes from ``AWS_ENDPOINT_URL`` (as botocore reads it), so a
local S3-compatible server works without any flag.

Every key is a relative POSIX path that stays inside the store (``safe_key``): keys read from the
store's own files (done markers, manifest, chunk table) are data, and a tampered one must not make
a reader or a deleter reach outside the store root, locally or on S3.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from pathlib import Path

import fsspec

TMP_DIR = ".tmp"


class StoreError(ValueError):
    """A one-line, user-facing problem with a store (a ValueError, so every CLI prints it as one line)."""


class UnsafeKeyError(StoreError):
    """A store key that would leave the store root (``../x``, ``/abs``, empty or ``.`` components)."""


@functools.lru_cache(maxsize=1 << 16)
def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a safe store-relative key, or None (pure, cached: keys repeat per sample)."""
    if not key:
        return "empty"
    if "\0" in key or "\\" in key:
        return "a NUL or backslash"
    if key.startswith("/") or key.startswith("~"):
        return "absolute"
    for part in key.split("/"):
        if part in ("", ".", ".."):
            return f"a {part!r} component" if part else "an empty component"
    return None


def safe_key(key, source: str | None = None, store: str | None = None) -> str:
    """``key`` if it is a relative POSIX path that stays inside the store, else UnsafeKeyError naming
    the key, the file it came from (``source``) and the store."""
    why = _key_problem(key) if isinstance(key, str) else f"not a string but {type(key).__name__}"
    if why is None:
        return key
    where = f"{source}: " if source else ""
    raise UnsafeKeyError(f"{where}path {key!r} refused ({why}): a store path must stay inside the store"
                         + (f" {store}" if store else ""))


def s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS S3"


def describe_s3_error(exc: BaseException, uri: str) -> StoreError | None:
    """The one-line StoreError (what is wrong, with what to do) for an S3 failure that is the user's
    to fix: no or wrong credentials, a bucket that does not exist, an endpoint that does not answer.
    None for anything else (the caller re-raises it as it is)."""
    import botocore.exceptions as bex

    bucket = uri[len("s3://"):].split("/", 1)[0]
    endpoint = s3_endpoint()
    msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StoreError(f"{uri}: no AWS credentials found ({msg}); set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for {endpoint}")
    if isinstance(exc, PermissionError) or (isinstance(exc, bex.ClientError) and exc.response.get("Error", {}).get(
            "Code") in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        return StoreError(f"{uri}: access denied by {endpoint} ({msg}); check AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that they may use bucket {bucket!r}")
    if (isinstance(exc, FileNotFoundError) and "bucket" in msg.lower()) or (
            isinstance(exc, bex.ClientError) and exc.response.get("Error", {}).get("Code") == "NoSuchBucket"):
        return StoreError(f"{uri}: no such bucket {bucket!r} at {endpoint}; create it or fix the store URI")
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return StoreError(f"{uri}: cannot reach the S3 endpoint {endpoint} ({msg}); check AWS_ENDPOINT_URL "
                          f"and the network")
    return None


def _s3_errors(method):
    """Store methods on S3: user-fixable S3 failures become one-line StoreErrors naming the store."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.remote:
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            err = describe_s3_error(exc, self.uri)
            if err is None:
                raise
            raise err from exc
    return wrapper


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
        """The filesystem path (s3fs: 'bucket/key') of a store-relative path ('' is the root);
        UnsafeKeyError for a key that would leave the store."""
        return f"{self.root}/{safe_key(rel, store=self.uri)}" if rel else self.root

    def resolve(self, rel: str, source: str | None = None) -> str:
        """``path(rel)`` for a key read from one of the store's files (``source``, named in the error):
        refused when it leaves the store lexically or, locally, through a symlink."""
        safe_key(rel, source, self.uri)
        full = f"{self.root}/{rel}"
        if not self.remote:
            real = os.path.realpath(full)
            if real != self.root and not real.startswith(self.root + os.sep):
                where = f"{source}: " if source else ""
                raise UnsafeKeyError(f"{where}path {rel!r} refused (resolves to {real}): a store path must stay "
                                     f"inside the store {self.uri}")
        return full

    def url(self, rel: str) -> str:
        """For messages: the URL of rel (never refused, so an error can name a bad key)."""
        full = f"{self.root}/{rel}" if rel else self.root
        return f"s3://{full}" if self.remote else full

    @_s3_errors
    def check(self) -> None:
        """On S3, that the bucket exists and these credentials may use it (StoreError saying which
        is wrong otherwise); a local store has nothing to check."""
        if self.remote:
            bucket = self.root.split("/", 1)[0]
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:  # HeadBucket's 404 carries no body: "Not Found"
                raise StoreError(f"{self.uri}: no such bucket {bucket!r} at {s3_endpoint()}; create it or fix "
                                 f"the store URI") from None

    # ---- reads -------------------------------------------------------------------------------
    @_s3_errors
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    @_s3_errors
    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    @_s3_errors
    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    @_s3_errors
    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(rel), start=start, end=end)

    @_s3_errors
    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    @_s3_errors
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

    @_s3_errors
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

    @_s3_errors
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

    @_s3_errors
    def remove(self, rel: str, source: str | None = None) -> None:
        """Delete rel if present; a key leaving the store (``source``: the file it came from) is refused."""
        full = self.resolve(rel, source)
        if self.fs.exists(full):
            self.fs.rm(full)

    def clean_tmp(self) -> None:
        """Remove what killed writers left under .tmp/ (local stores only; S3 has none)."""
        if not self.remote:
            shutil.rmtree(os.path.join(self.root, TMP_DIR), ignore_errors=True)
