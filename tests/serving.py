"""Helpers of the server tests (transformers and ray.serve.llm backends): a local Ray with one
server on it, the API key set while it starts, and raw HTTP posts that return the status."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_on_local_ray(model: str, key: str, **server_kwargs) -> Iterator:
    """``apo_ray.llm_api.server.start_server(model, **server_kwargs)`` on a fresh 2-CPU local Ray, with
    ``key`` as the server's API key; the app is stopped and Ray shut down afterwards."""
    import ray

    from apo_ray.llm_api.server import API_KEY_ENV, start_server, stop_server

    old_key = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = key
    # Workers import apo_ray from this checkout (it need not be installed).
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        server = start_server(model, port=free_port(), **server_kwargs)
        yield server
        stop_server(server.app_name)
    finally:
        ray.shutdown()
        if old_key is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = old_key


def post(url: str, body: bytes, key: str | None, content_type: str = "application/json") -> tuple[int, dict]:
    """POST ``body``; the HTTP status and the JSON answer (an error's body too)."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
