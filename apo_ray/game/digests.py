"""SHA-256 of files: of a checkpoint as it is written, and of data and model files, cached by
(path, size, mtime) so a large file is read once, not at every start."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from apo_ray import storage
from apo_ray.models.loading import cache_dir

log = logging.getLogger(__name__)


def file_sha256(path: Path, *, sync: bool = False, chunk_bytes: int = 1 << 22) -> tuple[int, str]:
    """Size in bytes and SHA-256 of ``path`` (one read, mostly from the page cache just after a
    write); with ``sync``, fsync it first."""
    digest = hashlib.sha256()
    with storage.open_file(path, "rb") as fh:
        if sync and not storage.is_uri(path):
            os.fsync(fh.fileno())
        while block := fh.read(chunk_bytes):
            digest.update(block)
        size = fh.tell()
    return size, digest.hexdigest()


_digest_lock = threading.Lock()
_digests: dict[str, dict] = {}  # this process's copy of the on-disk digest cache


def _digest_cache_path() -> Path:
    return cache_dir() / "file_digests.json"


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, cached by (path, size, mtime): a 100 MB data file is read once,
    not at every start. A file rewritten in place gets a new mtime and so is read again."""
    path = Path(path).resolve()
    stat = path.stat()
    ident = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = _digest_cache_path()
    with _digest_lock:
        if not _digests and cache_file.exists():
            try:
                _digests.update(json.loads(cache_file.read_text()))
            except (ValueError, OSError):  # a damaged cache only costs a re-read
                pass
        hit = _digests.get(str(path))
        if hit and {k: hit.get(k) for k in ident} == ident:
            return hit["sha256"]
    sha256 = file_sha256(path)[1]
    with _digest_lock:
        _digests[str(path)] = ident | {"sha256": sha256}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_digests))
            os.replace(tmp, cache_file)
        except OSError as exc:  # read-only home: the digest is still right, only not remembered
            log.debug("cannot write %s: %s", cache_file, exc)
    return sha256
