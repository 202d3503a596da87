"""Which folders a run may write into, and one run at a time per folder.

:func:`claim_output_dir` is the one entry: a context manager that, before a run writes anything,

1. refuses folders no run should write into: the filesystem root, the home folder, the checkout
   that holds this package (and anything that is not a folder);
2. accepts a folder that is new, empty (apart from ``ignore``: Hydra's own ``.hydra/`` and job log
   in its default output folder), or marked as a run's (:data:`MARKER`, written first by every run,
   or, for runs from before the marker, ``phases/fingerprint.json``), and refuses anything else,
   naming the files found: a user's folder is never written into;
3. takes the folder's lock (:data:`LOCK`: the holder's host, pid and process start time, created
   atomically with ``link(2)``): a second run on a busy folder is refused naming the holder; a lock
   whose process is gone from this host (or whose pid now belongs to another process) is stale and
   taken over with a warning. The lock is removed when the block ends.

Every refusal is an :class:`OwnershipError` (a ``ResumeError``, so the entry points print it
without a traceback); an ``OSError`` on the way is reported with its cause (permission denied,
no space left on device, not a directory) and the path.

The interface is path-in, context-out so that another storage (an object store URI) can get its
own implementation of the same three steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from apo_ray.game.store import ResumeError, write_durably

log = logging.getLogger(__name__)

MARKER = ".apo_run.json"  # {"format": 1, "created": <unix s>, "host": ..., "pid": ...}: this folder is a run's
LOCK = ".apo_run.lock"  # {"host", "pid", "start_ticks", "since"}: a run is writing here now
LEGACY_MARKER = Path("phases") / "fingerprint.json"  # a run from before MARKER existed
FORMAT = 1
CHECKOUT = Path(__file__).resolve().parents[2]  # apo_ray/game/ownership.py -> the checkout


class OwnershipError(ResumeError):
    """The output folder is not this run's to write into, or another run holds it."""


def os_cause(exc: OSError) -> str:
    """``<path>: <cause>`` of an OSError, e.g. ``/x/phases: No space left on device (ENOSPC)``."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    cause = (exc.strerror or str(exc)) + (f" ({name})" if name else "")
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {cause}" if where else cause


def forbidden_reason(folder: Path) -> str | None:
    """Why no run may write into ``folder`` (resolved), or None."""
    resolved = folder.resolve()
    if resolved == Path(resolved.anchor):
        return "it is the filesystem root"
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        if resolved == Path.home().resolve():
            return "it is the home folder"
    if resolved == CHECKOUT:
        return "it is the apo_ray checkout itself"
    return None


def _process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5); the name may hold spaces


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    if start_ticks is not None:
        now = _process_start_ticks(pid)
        return now is None or now == start_ticks
    return True


def _describe(entries: list[str], limit: int = 8) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_ownership(folder: Path, ignore: Iterable[str] = ()) -> bool:
    """Refuse ``folder`` unless a run may write into it; True when it is already marked as a run's.
    Writes nothing."""
    why = forbidden_reason(folder)
    if why:
        raise OwnershipError(f"run.output_dir={folder} is refused: {why}. Choose a folder of its own for the "
                             f"run (a new or empty one)")
    try:
        if folder.exists() and not folder.is_dir():
            raise OwnershipError(f"run.output_dir={folder} is not a directory")
        if (folder / MARKER).is_file() or (folder / LEGACY_MARKER).is_file():
            return True
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                         if p.name not in set(ignore) | {LOCK}) if folder.is_dir() else []
    except OSError as exc:
        raise OwnershipError(f"run.output_dir={folder} cannot be read: {os_cause(exc)}") from None
    if entries:
        raise OwnershipError(f"run.output_dir={folder} holds files that no apo_ray run wrote ({_describe(entries)}; "
                             f"no {MARKER}): refusing to write into it. Choose a new or empty folder")
    return False


def _lock_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _process_start_ticks(os.getpid()),
            "since": time.time(), "token": uuid.uuid4().hex}


def _read_lock(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def acquire_lock(folder: Path) -> dict:
    """Create ``folder/LOCK`` atomically (a complete temporary file hard-linked into place, so a
    reader never sees a half-written lock); take over a stale one. Returns the record written."""
    path = folder / LOCK
    record = _lock_record()
    tmp = folder / f"{LOCK}.{record['pid']}.{record['token'][:8]}.tmp"
    tmp.write_text(json.dumps(record))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return record
            except FileExistsError:
                pass
            held = _read_lock(path)
            if held is None:  # released meanwhile: try again
                continue
            host, pid = held.get("host"), held.get("pid")
            same_host = host == record["host"]
            if same_host and isinstance(pid, int) and not _alive(pid, held.get("start_ticks")):
                log.warning("%s: the run that held it (pid %s on %s) is gone; taking the stale lock over",
                            path, pid, host)
                # Rename (atomic) rather than unlink, so that of two runs taking it over only one wins.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, folder / f"{LOCK}.stale.{record['token'][:8]}")
                    os.unlink(folder / f"{LOCK}.stale.{record['token'][:8]}")
                continue
            since = held.get("since")
            age = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(
                since, (int, float)) else ""
            holder = f"pid {pid} on host {host}{age}" if held else "an unreadable lock"
            hint = ("wait for it to finish or stop it" if same_host or not held else
                    f"if that run is gone (this host cannot check another host's processes), delete {path}")
            raise OwnershipError(f"run.output_dir={folder} is in use by another run ({holder}; lock file {path}): "
                                 f"{hint}, then start again")
        raise OwnershipError(f"could not take the lock {path}: other runs keep taking it")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def release_lock(folder: Path, record: dict) -> None:
    """Remove the lock if it is still the one ``record`` wrote (never another run's)."""
    path = folder / LOCK
    held = _read_lock(path)
    if held and held.get("token") == record["token"]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def claim_output_dir(folder: str | os.PathLike[str], ignore: Iterable[str] = ()) -> Iterator[Path]:
    """Check, mark and lock ``folder`` for one run (see the module docstring); yields the folder.

    ``ignore``: names an unmarked folder may already hold (Hydra's ``.hydra`` and job log)."""
    folder = Path(folder).absolute()
    marked = check_ownership(folder, ignore)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        record = acquire_lock(folder)
    except OSError as exc:
        raise OwnershipError(f"run.output_dir={folder} cannot be used: {os_cause(exc)}") from None
    try:
        if not marked:
            try:
                write_durably(folder / MARKER, json.dumps({"format": FORMAT, "created": time.time(),
                                                           "host": record["host"], "pid": record["pid"]}).encode())
            except OSError as exc:
                raise OwnershipError(f"run.output_dir={folder}: cannot write {MARKER}: {os_cause(exc)}") from None
        yield folder
    finally:
        release_lock(folder, record)
