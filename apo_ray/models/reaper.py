"""Kill a process's helper processes once the process itself is gone, however it went.

vLLM runs its engine and model worker in child processes. When their owner is SIGKILLed (Ray's
``ray.kill``, an actor crash, the OOM killer) they are re-parented to init and keep their memory
and cores: Ray only kills a dead worker's children when the cluster runs its raylet as a
subreaper (``RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper``, off by default).
:func:`start_reaper` starts a small watcher process in its own session that waits for the owner
to disappear and then kills the listed processes.

Only the standard library and psutil are imported here: the watcher starts in well under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_SECONDS = 1.0


def _identity(pid: int) -> tuple[int, float] | None:
    """(pid, start time): a pid alone may be reused by a later process."""
    import psutil

    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def start_reaper(owner_pid: int, pids: list[int]) -> subprocess.Popen | None:
    """Start the watcher for ``pids`` (children of ``owner_pid``); None when there is nothing to watch."""
    targets = [t for t in (_identity(p) for p in pids) if t is not None]
    owner = _identity(owner_pid)
    if not targets or owner is None:
        return None
    args = [sys.executable, "-m", "apo_ray.models.reaper", f"{owner[0]}:{owner[1]!r}"]
    args += [f"{pid}:{created!r}" for pid, created in targets]
    env = dict(os.environ)
    # The watcher must import this module the way its owner did (e.g. PYTHONPATH=<worktree>).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, close_fds=True)


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(owner: tuple[int, float], targets: list[tuple[int, float]]) -> None:
    """Wait until the owner is gone, then SIGKILL the targets still alive (as the same processes)."""
    import psutil

    while _alive(*owner):
        if not any(_alive(*t) for t in targets):
            return  # shut down normally: nothing left to reap
        time.sleep(POLL_SECONDS)
    for pid, created in targets:
        if _alive(pid, created):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def _parse(arg: str) -> tuple[int, float]:
    pid, created = arg.split(":", 1)
    return int(pid), float(created)


if __name__ == "__main__":
    watch(_parse(sys.argv[1]), [_parse(a) for a in sys.argv[2:]])
