"""Where a run's files live: a local folder, or a URI on any filesystem fsspec knows (``s3://``,
``gs://``, ``abfs://``, ...), so a cluster without a shared file system can still resume a run, and
a learner or pool on another node can reload a checkpoint the driver wrote.

Local paths keep the plain ``os``/``pathlib`` calls (and their fsync-rename durability); URIs go
through fsspec, whose protocol packages are extras (``pip install 'apo-ray[s3]'`` for s3fs). On an
object store a written object appears whole or not at all, which is the atomicity the phase store
needs; there is nothing to fsync.

Credentials come from the environment of each process that touches the storage (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``, an instance role, or
``~/.aws``), read by the filesystem's own client library. apo_ray never copies them into a config, a
log, a report or a Ray runtime environment; each node of a cluster needs them in its own
environment. A URI that carries credentials (``s3://key:secret@bucket``) is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

PathLike = str | os.PathLike


def is_uri(path: PathLike) -> bool:
    """Whether ``path`` names a remote filesystem (a scheme other than ``file``)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(base: PathLike, *parts: str) -> Any:
    """``base/part/...``: a ``str`` URI for a URI base, else a ``Path``."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base, *parts)


def name(path: PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: PathLike) -> Any:
    if is_uri(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return Path(path).parent


def uri_problems(path: PathLike, field: str = "run.output_dir") -> list[str]:
    """Why ``path`` cannot be used as a run's storage (empty when it can): credentials in the URI,
    or a protocol whose fsspec package is not installed. Nothing is contacted."""
    if not is_uri(path):
        return []
    parts = urlsplit(str(path))
    problems = []
    if parts.username or parts.password:
        problems.append(f"{field}: the URI carries credentials; give them in the environment (e.g. "
                        f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never in the config")
    try:
        import fsspec

        fsspec.get_filesystem_class(parts.scheme)
    except ImportError as exc:
        extra = " (pip install 'apo-ray[s3]')" if parts.scheme in ("s3", "s3a") else ""
        problems.append(f"{field}={_redacted(parts)}: the {parts.scheme}:// filesystem needs a package that is "
                        f"not installed{extra}: {exc}")
    except ValueError:
        problems.append(f"{field}={_redacted(parts)}: fsspec knows no filesystem {parts.scheme}://")
    return problems


def _redacted(parts) -> str:
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{parts.path}"


def _fs(path: PathLike):
    from fsspec.core import url_to_fs

    return url_to_fs(str(path))


# -- reading ---------------------------------------------------------------------------------------
def exists(path: PathLike) -> bool:
    if not is_uri(path):
        return Path(path).exists()
    fs, p = _fs(path)
    return fs.exists(p)


def is_dir(path: PathLike) -> bool:
    if not is_uri(path):
        return Path(path).is_dir()
    fs, p = _fs(path)
    return fs.isdir(p)


def size(path: PathLike) -> int:
    if not is_uri(path):
        return Path(path).stat().st_size
    fs, p = _fs(path)
    return int(fs.size(p))


def read_bytes(path: PathLike) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def listdir(path: PathLike) -> list[str]:
    """Names of the entries directly in ``path`` (empty when it does not exist)."""
    if not is_uri(path):
        return sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
    fs, p = _fs(path)
    if not fs.isdir(p):
        return []
    return sorted(name(entry) for entry in fs.ls(p, detail=False, refresh=True))


def open_file(path: PathLike, mode: str = "rb") -> IO:
    """A file object (``rb`` or ``wb``) for ``torch.save``/``torch.load`` and streaming reads. A
    remote file written this way appears as a whole when it is closed."""
    if not is_uri(path):
        return open(path, mode)
    fs, p = _fs(path)
    return fs.open(p, mode)


# -- writing ---------------------------------------------------------------------------------------
def makedirs(path: PathLike) -> None:
    """Local: create the folder. Object stores have no folders (a key's prefix is enough)."""
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``path`` whole (no durability promise locally; see ``store.write_durably`` for that)."""
    if not is_uri(path):
        Path(path).write_bytes(data)
        return
    fs, p = _fs(path)
    fs.pipe_file(p, data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def rename(src: PathLike, dst: PathLike) -> None:
    if not is_uri(src):
        os.replace(src, dst)
        return
    fs, p = _fs(src)
    fs.mv(p, _fs(dst)[1])


@contextlib.contextmanager
def local_folder(path: PathLike, *, prefix: str = "apo-out-") -> Iterator[Path]:
    """A local folder standing for ``path``: ``path`` itself when it is local; for a URI, a temporary
    folder whose files are uploaded under ``path`` when the block ends without an error (for
    writers that need a real folder: reports with their figures, model exports)."""
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
        upload_tree(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_tree(local: Path, dest: PathLike) -> None:
    """Copy every file under ``local`` to the same relative key under ``dest``."""
    fs, p = _fs(dest)
    for file in sorted(f for f in Path(local).rglob("*") if f.is_file()):
        fs.put_file(str(file), f"{p.rstrip('/')}/{file.relative_to(local).as_posix()}")


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[Path]:
    """A local file with ``path``'s bytes, for readers that need a real file (safetensors' memory
    map): ``path`` itself when it is local; for a URI, a temporary copy (one GET), removed after."""
    if not is_uri(path):
        yield Path(path)
        return
    fd, tmp = tempfile.mkstemp(prefix="apo-read-", suffix="-" + name(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(read_bytes(path))
        yield Path(tmp)
    finally:
        os.unlink(tmp)
