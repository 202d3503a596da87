"""Ray's OpenAI app on vLLM (`ray.serve.llm`, assembled by :func:`apo_ray.llm_api.server.start_server`) against
the real `openai` client over HTTP: chat, streaming chat, completions with logprobs, the model list;
and the request guard in front of it (key first, body cap, bad sampling fields named). One engine
(the tiny random Llama on vLLM's CPU build) serves the module. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request

import openai
import pytest
from serving import abandoned_request, post, read_status, server_on_local_ray, stalled_upload

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
              pytest.mark.slow]

TINY = "tiny-random-llama"
KEY = "llm-serve-key-for-tests"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
BODY_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def served(tiny_model):
    with server_on_local_ray(TINY, KEY, backend="vllm", dtype="float32", max_model_len=512,
                             max_body_bytes=64 << 10, engine_kwargs={"kv_cache_memory_bytes": 64 << 20},
                             body_timeout_s=BODY_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)


def test_served_by_ray_serve_llm_under_its_own_route(served):
    assert served.backend == "vllm"
    assert served.app_name.startswith("apo-chat-") and f"/{served.app_name}/v1" in served.base_url


def test_chat_completion(client):
    r = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert r.object == "chat.completion" and r.model == TINY and len(r.choices) == 2
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    again = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    assert [m.id for m in client.models.list().data] == [TINY]


def test_streaming_chat_gives_the_same_text_as_one_response(client):
    whole = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=8, temperature=0)
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish in ("stop", "length")


def test_completions_with_logprobs(client):
    r = client.completions.create(model=TINY, prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and isinstance(choice.text, str)
    assert len(choice.logprobs.tokens) == r.usage.completion_tokens == 5
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def _post(url: str, body: bytes, key: str | None = KEY, content_type: str = "application/json"):
    return post(url, body, key, content_type)


def test_the_key_is_checked_first_on_every_path(served):
    chat = served.base_url + "/chat/completions"
    assert _post(chat, b"{not json", key=None)[0] == 401  # not 400/422: the body is never parsed
    assert _post(chat, b"{not json", key="wrong")[0] == 401
    root = served.base_url[: -len("/v1")]
    for path in ("/docs", "/openapi.json", "/v1/models"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(root + path, timeout=30)
        assert err.value.code == 401, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("field,value", [("n", 0), ("max_tokens", 0), ("max_tokens", -3),
                                         ("max_completion_tokens", 0), ("temperature", float("nan")),
                                         ("temperature", -1.0), ("top_p", 0.0)])
def test_bad_sampling_fields_are_400_naming_the_field(served, field, value):
    body = json.dumps({"model": TINY, "messages": MESSAGES, field: value}).encode()  # NaN as JSON's NaN
    status, err = _post(served.base_url + "/chat/completions", body)
    assert status == 400 and err["error"]["param"] == field, err


def test_oversized_body_is_refused(served):
    big = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "x" * (80 << 10)}]}).encode()
    status, err = _post(served.base_url + "/chat/completions", big)
    assert status == 413 and err["error"]["code"] == "request_too_large"


def _timed(url: str, body: dict) -> tuple[int, float]:
    import time

    start = time.monotonic()
    status, _ = _post(url, json.dumps(body).encode())
    return status, time.monotonic() - start


def test_stalled_uploads_are_dropped_and_abandoned_requests_do_not_hold_others(served):
    import threading
    import time

    chat = served.base_url + "/chat/completions"
    normal = {"model": TINY, "messages": MESSAGES, "max_tokens": 4}
    stalled = [stalled_upload(chat, KEY) for _ in range(8)]
    time.sleep(0.5)
    status, seconds = _timed(chat, normal)
    assert status == 200 and seconds < BODY_TIMEOUT_S + 5, seconds
    assert [read_status(sock, BODY_TIMEOUT_S + 10) for sock in stalled] == [408] * len(stalled)

    heavy = {"model": TINY, "messages": MESSAGES, "n": 16, "max_tokens": 400, "ignore_eos": True}
    status, one_heavy_s = _timed(chat, heavy)
    assert status == 200
    threads = [threading.Thread(target=abandoned_request, args=(chat, KEY, heavy)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status, seconds = _timed(chat, normal)
    assert status == 200 and seconds < max(2 * one_heavy_s, 5.0), (seconds, one_heavy_s)


@pytest.mark.parametrize(("body", "param"), [
    (b"[]", None), (json.dumps({"model": TINY}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": TINY, "messages": MESSAGES, "n": "abc"}).encode(), "n"),
    (json.dumps({"model": TINY, "messages": MESSAGES, "seed": "x"}).encode(), "seed"),
    (json.dumps({"model": TINY, "messages": MESSAGES, "stop": 5}).encode(), "stop"),
])
def test_malformed_requests_are_4xx(served, body, param):
    status, err = _post(served.base_url + "/chat/completions", body)
    assert 400 <= status < 500, (status, err)
    if param is not None:
        assert param in json.dumps(err), err
