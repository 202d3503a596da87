"""Normal requests' latency on our chat server beside hostile clients, before and after issue 22.

One run, on 127.0.0.1 only, bounded by client timeouts: the server of this checkout and the server of
``--base`` (default a5fbc38, before the fix; its package via ``results_io.run_at_ref``) each get,
on a fresh private local Ray with a fresh server (transformers backend, ``--model``):

- ``idle``: ``--requests`` normal requests one after another (max_tokens 4);
- ``stalled``: the same while ``--stalled`` clients hold uploads open (headers with
  ``Content-Length: 1000``, 5 body bytes, then nothing);
- ``abandoned``: the same right after ``--abandoned`` clients sent ``{"n": 16, "max_tokens": 512}``
  and disconnected.

A normal request that takes longer than ``--timeout-s`` counts as timed out at that latency. Prints
a table (median, min, max seconds and timeouts per scenario and version, with the load average) and
writes JSON under ``benchmarks/results/``.

    PYTHONPATH=$PWD python benchmarks/serve_load.py
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"


def _head(url: str, length: int) -> tuple[tuple[str, int], bytes]:
    parts = urlsplit(url)
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {length}\r\nAuthorization: Bearer {KEY}\r\n\r\n")
    return (parts.hostname, parts.port), head.encode()


def stall(url: str) -> socket.socket:
    where, head = _head(url, 1000)
    sock = socket.create_connection(where, timeout=30)
    sock.sendall(head + b'{"mo')
    return sock


def abandon(url: str, body: dict) -> None:
    data = json.dumps(body).encode()
    where, head = _head(url, len(data))
    with socket.create_connection(where, timeout=30) as sock:
        sock.sendall(head + data)
        time.sleep(0.2)  # reaches the server, then the client is gone


def normal(url: str, body: dict, timeout_s: float) -> tuple[float, bool]:
    """Seconds of one normal request and whether it answered 200 in time."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            ok = resp.status == 200 and bool(json.load(resp)["choices"])
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    return min(time.monotonic() - start, timeout_s), ok


def measure(args) -> dict:
    """All scenarios against the apo_ray importable here (this checkout's or the base's)."""
    import importlib

    import ray

    try:  # the layout after issue 20, or the flat one of the base commit
        serve_module = importlib.import_module("apo_ray.llm_api.server")
    except ImportError:
        serve_module = importlib.import_module("apo_ray.serve")

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ[serve_module.API_KEY_ENV] = KEY
        wanted = {"backend": "transformers", "port": port, "max_new_tokens_cap": 512}
        accepted = inspect.signature(serve_module.start_server).parameters
        server = serve_module.start_server(args.model, **{k: v for k, v in wanted.items() if k in accepted})
        url = server.base_url + "/chat/completions"
        body = {"model": args.model, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
                "seed": 1}
        heavy = {"model": args.model, "messages": [{"role": "user", "content": "Write a long story."}], "n": 16,
                 "max_tokens": 512}
        normal(url, body, 60)  # warm-up
        out = {}
        for scenario in ("idle", "stalled", "abandoned"):
            stalled = []
            if scenario == "stalled":
                stalled = [stall(url) for _ in range(args.stalled)]
                time.sleep(0.5)
            elif scenario == "abandoned":
                threads = [threading.Thread(target=abandon, args=(url, heavy)) for _ in range(args.abandoned)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            load_before = os.getloadavg()[0]
            runs = [normal(url, body, args.timeout_s) for _ in range(args.requests)]
            for sock in stalled:
                sock.close()
            seconds = [s for s, _ in runs]
            out[scenario] = {"seconds": seconds, "ok": [ok for _, ok in runs], "median_s": statistics.median(seconds),
                             "min_s": min(seconds), "max_s": max(seconds),
                             "timeouts": sum(1 for _, ok in runs if not ok),
                             "load_avg_1m": [load_before, os.getloadavg()[0]]}
            time.sleep(2.0)  # leftovers of this scenario (the old server's abandoned work) drain a little
        serve_module.stop_server(server.app_name)
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--base", default="a5fbc38", help="the commit before the fix")
    parser.add_argument("--requests", type=int, default=5, help="normal requests per scenario")
    parser.add_argument("--stalled", type=int, default=6)
    parser.add_argument("--abandoned", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="a normal request's client timeout")
    parser.add_argument("--measure-only", action="store_true", help="(internal) measure the importable apo_ray")
    parser.add_argument("--out", default="benchmarks/results/serve_load_cpu.json")
    args = parser.parse_args()
    flags = ["--model", args.model, "--requests", str(args.requests), "--stalled", str(args.stalled),
             "--abandoned", str(args.abandoned), "--timeout-s", str(args.timeout_s), "--measure-only"]
    if args.measure_only:
        Path(args.out).write_text(json.dumps(measure(args)))
        return

    from benchmarks.results_io import run_at_ref, write_result

    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # this checkout, in its own process like the base
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags, "--out", f"{tmp}/now.json"],
                       cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        results["after"] = json.loads(Path(f"{tmp}/now.json").read_text())
    results["before"] = run_at_ref(args.base, Path(__file__).resolve(), flags)

    print(f"\nnormal requests (max_tokens 4, {args.requests} each, client timeout {args.timeout_s:g} s), "
          f"model {args.model}; before = {args.base}, after = this checkout")
    print(f"{'scenario':<34} {'version':<7} {'median s':>9} {'min s':>7} {'max s':>7} {'timeouts':>9} {'load 1m':>8}")
    labels = {"idle": "idle", "stalled": f"{args.stalled} stalled uploads open",
              "abandoned": f"after {args.abandoned} abandoned n=16x512"}
    for scenario, label in labels.items():
        for version in ("before", "after"):
            r = results[version][scenario]
            print(f"{label:<34} {version:<7} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['max_s']:>7.2f} "
                  f"{r['timeouts']:>6}/{args.requests:<2} {r['load_avg_1m'][0]:>8.2f}")
    write_result({"benchmark": "serve_load", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                  "python": platform.python_version(), "settings": vars(args), "base": args.base,
                  "results": results}, args.out)


if __name__ == "__main__":
    main()
