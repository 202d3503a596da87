"""Which Ray a run uses (apo_ray.launch.connect_ray): a private local instance unless a cluster is
named (cluster.address, `auto` only when asked, or $RAY_ADDRESS as `ray job submit` sets it), and a
named cluster that cannot be joined fails within cluster.connect_timeout_s naming the address."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from apo_ray.config import Config
from apo_ray.runtime.launch import USER_ERRORS, ClusterConnectError, probe_ray, ray_target

ROOT = Path(__file__).resolve().parents[1]


def _cfg(address=None) -> Config:
    cfg = Config()
    cfg.cluster.address = address
    return cfg


def test_only_a_named_cluster_is_joined(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_target(_cfg()) is None  # a private local instance, not address="auto"
    assert ray_target(_cfg("local")) is None
    assert ray_target(_cfg("auto")) == "auto"  # only when asked for
    assert ray_target(_cfg("10.0.0.1:6379")) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")  # what `ray job submit` gives the entry point
    assert ray_target(_cfg()) == "127.0.0.1:6380"
    assert ray_target(_cfg("10.0.0.1:6379")) == "10.0.0.1:6379"  # the config wins
    assert issubclass(ClusterConnectError, USER_ERRORS)


def test_a_closed_port_is_named_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    start = time.monotonic()
    with pytest.raises(ClusterConnectError, match=rf"127\.0\.0\.1:{port}.*[Cc]onnection refused.*cluster\.address"):
        probe_ray(f"127.0.0.1:{port}", 30)
    assert time.monotonic() - start < 10


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_a_head_that_never_answers_fails_within_the_timeout():
    """A listener that accepts and then says nothing: ray.init alone would retry for minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        address = f"127.0.0.1:{s.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ClusterConnectError, match=rf"{address}.*within 8 s \(cluster\.connect_timeout_s\)"):
            probe_ray(address, 8)
        assert time.monotonic() - start < 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
@pytest.mark.slow
def test_a_strangers_token_protected_cluster_is_neither_joined_nor_waited_on(tmp_path):
    """Another user's head on this machine (token auth, `ray start`): a run with no address starts its
    own Ray beside it; naming it without the token fails within the timeout, saying so."""
    temp_dir = tempfile.mkdtemp(prefix="rayx", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    start = subprocess.run(
        ["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", *(f"--{flag}={_free_port()}" for flag in (
             "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port"))],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        mine = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
        script = (
            "import sys, ray\n"
            "from apo_ray.config import Config\n"
            "from apo_ray.runtime.launch import connect_ray\n"
            "cfg = Config(); cfg.cluster.local_num_cpus = 1\n"
            "assert connect_ray(cfg)\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(mine, PYTHONPATH=str(ROOT)), check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        gcs = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS"))
        assert gcs != f"127.0.0.1:{port}" and not gcs.endswith(f":{port}")  # its own instance
        # naming the stranger's head without its token: a bounded, clear failure
        script = (
            "import sys, time\n"
            "from apo_ray.config import Config\n"
            "from apo_ray.runtime.launch import connect_ray, ClusterConnectError\n"
            f"cfg = Config(); cfg.cluster.address = '127.0.0.1:{port}'; cfg.cluster.connect_timeout_s = 20\n"
            "t = time.monotonic()\n"
            "try:\n    connect_ray(cfg)\nexcept ClusterConnectError as e:\n"
            "    print('ERR', round(time.monotonic() - t), e)\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=dict(mine, PYTHONPATH=str(ROOT)), check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ERR")), None)
        assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert int(line.split()[1]) < 40 and f"127.0.0.1:{port}" in line and "RAY_AUTH_TOKEN" in line
    finally:
        _kill_processes_of(temp_dir)


def _kill_processes_of(temp_dir: str) -> None:
    """SIGKILL, one pid at a time, the processes of the head this test started (their command lines
    name its own temp dir); `ray stop` would stop every Ray on the machine."""
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
