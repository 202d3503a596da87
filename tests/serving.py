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


def _raw_headers(url: str, key: str | None, content_length: int) -> tuple[str, int, bytes]:
    """(host, port, request head) of a raw POST to ``url``."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n"
            + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n")
    return parts.hostname, parts.port, head.encode()


def stalled_upload(url: str, key: str | None, declared_bytes: int = 1000, sent: bytes = b'{"mo') -> socket.socket:
    """A client that declares ``declared_bytes`` of body, sends ``sent`` and then goes idle; the open
    socket is returned (read it to see what the server did, close it to end the stall)."""
    host, port, head = _raw_headers(url, key, declared_bytes)
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(head + sent)
    return sock


def abandoned_request(url: str, key: str | None, body: dict, linger_s: float = 0.2) -> None:
    """Send a whole request, wait ``linger_s`` for it to reach the server, and disconnect without
    reading the answer."""
    import time

    data = json.dumps(body).encode()
    host, port, head = _raw_headers(url, key, len(data))
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(head + data)
        time.sleep(linger_s)


def read_status(sock: socket.socket, timeout_s: float) -> int | None:
    """The HTTP status the server sent on ``sock`` within ``timeout_s`` (None: nothing, or closed)."""
    sock.settimeout(timeout_s)
    try:
        first = sock.recv(64)
    except OSError:
        return None
    finally:
        sock.close()
    parts = first.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
