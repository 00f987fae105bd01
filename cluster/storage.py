"""Run-folder storage through fsspec: local paths, s3://, gs://, memory://.

Every write is a commit: a local file is written beside its final name and renamed over
it; an object store writes an object in one PUT. Readers therefore never see half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file

from .errors import UserError


#: how S3 is tried before an operation gives up: seconds, never a long hang (botocore's
#: defaults retry 5 times over ~20 s and wait 60 s on a silent server). A user's own
#: `config_kwargs` in fsspec's config win over these.
S3_CLIENT = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3, "mode": "standard"}}
#: the up-front reachability check (`check_reachable`): tighter still
S3_CHECK = {"connect_timeout": 3, "read_timeout": 3, "retries": {"max_attempts": 2, "mode": "standard"}}


def protocol_of(url: str) -> str:
    return "file" if is_local(url) else url.split("://", 1)[0]


def open_fs(url: str, storage_options: dict[str, Any] | None = None, client: dict[str, Any] | None = None,
            retries: int = 2) -> tuple[Any, str]:
    """fsspec's (filesystem, path) for a URL, with bounded timeouts and retries on S3 (the
    one place this project opens remote storage)."""
    opts = dict(storage_options or {})
    if protocol_of(url) in ("s3", "s3a"):
        user = (fsspec.config.conf.get("s3") or {}).get("config_kwargs") or {}
        opts["config_kwargs"] = {**(client or S3_CLIENT), **user, **(opts.get("config_kwargs") or {})}
    fs, path = fsspec.core.url_to_fs(local_path(url) if is_local(url) else url, **opts)
    if hasattr(fs, "retries"):  # s3fs's own retry loop around botocore's (5 by default, with backoff)
        fs.retries = min(fs.retries, retries)
    return fs, path


#: exception class names that mean "the storage could not be reached or refused us", from the
#: libraries fsspec's remote filesystems use (botocore, aiohttp, requests, google-auth)
UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
               "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ClientConnectorError",
               "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError", "ConnectionRefusedError",
               "ConnectionResetError", "ConnectionError", "TimeoutError", "FSTimeoutError", "PermissionError",
               "RefreshError", "DefaultCredentialsError", "gaierror"}


def unreachable_reason(error: BaseException) -> str | None:
    """One line saying why storage could not be reached, if `error` (or what caused it) is
    such a failure; None for anything else (a missing file, a bug)."""
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < 8:
        if type(e).__name__ in UNREACHABLE or any(c.__name__ in UNREACHABLE for c in type(e).__mro__[1:-2]):
            text = str(e).splitlines()[0] if str(e) else ""
            return f"{type(e).__name__}: {text}" if text else type(e).__name__
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def check_reachable(url: str, what: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail with one line (UserError) unless remote storage at `url` answers, within seconds:
    called before a run writes anything. A missing object is fine here (the caller says what
    it needed); local paths are not checked."""
    if is_local(url) or url.startswith("bundled:"):
        return
    try:
        fs, path = open_fs(url, dict(storage_options or {}, skip_instance_cache=True), client=S3_CHECK, retries=1)
        fs.exists(path)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
    except Exception as e:  # noqa: BLE001 - classified below; anything else is not ours to hide
        reason = unreachable_reason(e)
        if reason is None and not isinstance(e, (ImportError, ValueError)):
            raise
        raise UserError(f"cannot reach the {what} at {url}: {reason or str(e).splitlines()[0]}") from None


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


class Storage:
    """A folder addressed by URL; paths passed to methods are relative to it."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.local = is_local(root)
        self.fs, self.base = open_fs(root, storage_options)
        if self.local:
            self.base = os.path.abspath(self.base)

    def path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def url(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def worker_url(self) -> str:
        """The folder as every process resolves it, whatever its working directory (Ray tasks
        and Ray Train workers start elsewhere): the absolute path when local, else the URL."""
        return self.path() if self.local else self.url()

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        if not self.exists(rel):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def rm(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    # --- bytes and json -------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def sha256(self, rel: str) -> str:
        """Hex SHA-256 of a file, streamed in 8 MiB blocks."""
        return file_sha256(self.fs.open(self.path(rel), "rb"))

    def files(self, rel: str) -> list[str]:
        """Every file at or below `rel` (a file or a folder), relative to the root, sorted."""
        if not self.exists(rel):
            return []
        if not self.fs.isdir(self.path(rel)):
            return [rel]
        base = self.path()
        return sorted(p[len(base) + 1:] if p.startswith(base + "/") else p
                      for p in self.fs.find(self.path(rel)))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    # --- tensors ----------------------------------------------------------
    def save_tensors(self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if self.local:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, target)
        else:
            self.write_bytes(rel, save(tensors, metadata=metadata))

    def load_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        if self.local:
            return load_file(self.path(rel))
        return st_load(self.read_bytes(rel))

    def tensor_metadata(self, rel: str) -> dict[str, str]:
        """The `__metadata__` of a safetensors file, reading only its header."""
        import struct
        with self.fs.open(self.path(rel), "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return header.get("__metadata__", {}) or {}

    def copy_in(self, other: "Storage", rel: str) -> None:
        """Copy the file `rel` of another folder to the same place in this one, as a commit.

        Both local: a hard link (committed files are never modified in place, only replaced
        by rename, so sharing the inode is safe and costs no space); one object store: its
        server-side copy; otherwise through this process.
        """
        src, dst = other.path(rel), self.path(rel)
        if self.local and other.local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                os.link(src, tmp)
            except OSError:  # another filesystem, or links not allowed
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        elif type(self.fs) is type(other.fs) and not self.local and self.fs.storage_options == other.fs.storage_options:
            self.fs.copy(src, dst)
        else:
            self.write_bytes(rel, other.read_bytes(rel))

    # --- folders ------------------------------------------------------------
    def put_dir(self, local_dir: str, rel: str) -> None:
        """Publish a finished local folder at rel, replacing what was there.

        Locally this is one rename. On an object store the files are uploaded with the
        index (`*.index.json`) last, so its presence marks a complete checkpoint.
        """
        if self.local:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            old = None
            if os.path.exists(target):
                old = f"{target}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
            shutil.move(local_dir, target)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return
        self.rm(rel)
        files = sorted(Path(local_dir).iterdir(), key=lambda p: p.name.endswith(".index.json"))
        for p in files:
            self.fs.put_file(str(p), self.path(f"{rel}/{p.name}"))


def file_sha256(f) -> str:
    """Hex SHA-256 of an open binary file (read in 8 MiB blocks, then closed)."""
    h = hashlib.sha256()
    with f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where converted models and remote files are cached (SOCO_CACHE overrides)."""
    return Path(os.environ.get("SOCO_CACHE", Path.home() / ".cache" / "soco"))


def fetch_to_cache(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Local path of a remote file, downloaded once into the cache (local paths pass through).

    Files of one remote folder land in one local folder (a tokenizer needs its files side by
    side); the folder key includes the object's version (ETag or mtime and size), so a
    rewritten remote file is fetched again rather than served stale.
    """
    if is_local(url):
        return local_path(url)
    fs, p = open_fs(url, storage_options)
    info = fs.info(p)
    version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "") + str(info.get("size"))
    folder = hashlib.sha256(url.rsplit("/", 1)[0].encode()).hexdigest()[:16]
    target = cache_dir() / "remote" / folder / os.path.basename(url.rstrip("/"))
    stamp = target.with_name(target.name + ".version")
    if not (target.exists() and stamp.exists() and stamp.read_text() == version):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp-{uuid.uuid4().hex[:8]}")
        fs.get_file(p, str(tmp))
        os.replace(tmp, target)
        stamp.write_text(version)
    return str(target)
