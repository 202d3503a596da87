"""Our own server (transformers backend) against hostile clients: stalled uploads are dropped
without blocking others, abandoned requests stop generating, malformed requests get a 4xx naming
the field (never a 500), and only Serve's own `/-/routes` and `/-/healthz` answer without the key."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from serving import abandoned_request, post, read_status, server_on_local_ray, stalled_upload

TINY = "tiny-random-llama"
KEY = "hostile-key"
BODY_TIMEOUT_S = 3.0
NORMAL = {"model": TINY, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "seed": 1}
HEAVY = {"model": TINY, "messages": [{"role": "user", "content": "Write a long story."}], "n": 16, "max_tokens": 512}


@pytest.fixture(scope="module")
def served(tiny_model):
    with server_on_local_ray(TINY, KEY, backend="transformers", max_new_tokens_cap=512,
                             body_timeout_s=BODY_TIMEOUT_S) as server:
        yield server


def _timed_post(url: str, body: dict) -> tuple[int, float]:
    start = time.monotonic()
    status, _ = post(url, json.dumps(body).encode(), KEY)
    return status, time.monotonic() - start


def test_stalled_uploads_are_dropped_and_do_not_block_others(served):
    chat = served.base_url + "/chat/completions"
    stalled = [stalled_upload(chat, KEY) for _ in range(8)]  # more than Serve's default 5 slots per replica
    time.sleep(0.5)
    status, seconds = _timed_post(chat, NORMAL)
    assert status == 200 and seconds < BODY_TIMEOUT_S, seconds  # served while the stalls still hang
    statuses = [read_status(sock, BODY_TIMEOUT_S + 10) for sock in stalled]
    assert statuses == [408] * len(stalled)


def test_abandoned_requests_stop_generating(served):
    chat = served.base_url + "/chat/completions"
    # what one abandoned request costs when it runs to the end (n=16 x 512 tokens)
    status, one_heavy_s = _timed_post(chat, HEAVY)
    assert status == 200
    threads = [threading.Thread(target=abandoned_request, args=(chat, KEY, HEAVY)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # they are queued or generating now; each one's client is gone
    status, seconds = _timed_post(chat, NORMAL)
    assert status == 200
    # Without cancellation the normal request waits for ten heavy generations (~10 x one_heavy_s).
    assert seconds < max(2 * one_heavy_s, 3.0), (seconds, one_heavy_s)


MALFORMED = [
    (b"{not json", None),
    (b"[]", None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "model"),
    (json.dumps({"model": TINY}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": ["hi"]}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": []}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": [{"role": 5, "content": "hi"}]}).encode(), "messages[0]"),
    (json.dumps({"model": TINY, "messages": [{"role": "user", "content": 5}]}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": [{"role": "user", "content": [{"type": "image"}]}]}).encode(), "messages"),
    (json.dumps(NORMAL | {"n": "abc"}).encode(), "n"),
    (json.dumps(NORMAL | {"n": 1000}).encode(), "n"),
    (json.dumps(NORMAL | {"max_tokens": 1.5}).encode(), "max_tokens"),
    (json.dumps(NORMAL | {"temperature": "hot"}).encode(), "temperature"),
    (json.dumps(NORMAL | {"seed": 2**70}).encode(), "seed"),
    (json.dumps(NORMAL | {"seed": -1}).encode(), "seed"),
    (json.dumps(NORMAL | {"stop": 5}).encode(), "stop"),
    (json.dumps(NORMAL | {"stop": [1, 2]}).encode(), "stop"),
    (json.dumps(NORMAL | {"stream": "yes"}).encode(), "stream"),
    (json.dumps(NORMAL | {"model": "other"}).encode(), "model"),
]


@pytest.mark.parametrize(("body", "param"), MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_requests_are_4xx_naming_the_field(served, body, param):
    status, answer = post(served.base_url + "/chat/completions", body, KEY)
    assert 400 <= status < 500, (status, answer)
    if param is not None:
        assert (answer["error"]["param"] or "").startswith(param), answer


def test_only_serves_own_health_and_route_paths_are_open(served):
    root = served.base_url[: -len("/v1")]
    origin = root[: root.index("/", len("http://"))]
    for path in ("/-/healthz", "/-/routes"):  # answered by Ray Serve's proxy before any app: README says so
        with urllib.request.urlopen(origin + path, timeout=30) as resp:
            assert resp.status == 200
            assert b"chat" not in resp.read().lower() or path == "/-/routes"
    for url in (root + "/v1/models", root + "/docs", root + "/openapi.json", root + "/anything", root + "/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=30)
        assert err.value.code == 401, url
