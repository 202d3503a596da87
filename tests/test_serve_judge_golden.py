"""OpenAI-compatible serving on Ray Serve, the pairwise LLM judge and golden-answer collection.

Two servers:
- the real one (:func:`apo_ray.serve.start_server` on a local Ray, tiny random Llama): plumbing and
  schema, and end-to-end judge/golden runs (its text is random, so its verdicts are "invalid");
- a scripted OpenAI-compatible HTTP server defined here, that returns canned texts and errors, to
  test the judge's and the collector's logic: swaps, retries, cache, refusals, resume.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from apo_ray.data import load_golden_answers, load_preference_pairs, query_key
from apo_ray.golden import (
    CANNED_REFUSALS,
    GOLDEN_SYSTEM_PROMPT,
    WHY_TURN,
    canned_refusal,
    collect_golden_answers,
    is_bare_refusal,
)
from apo_ray.judge import ChatAPI, JudgeClient, summarize_records
from apo_ray.metrics import OUTCOMES
from apo_ray.models import hh_to_messages

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-random-llama"
SERVE_KEY = "serve-key-for-tests"


# --------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server
# --------------------------------------------------------------------------------------------------


def completion(text: str, finish_reason: str = "stop") -> tuple[int, dict, dict]:
    return 200, {
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": 0, "model": "scripted",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }, {}


def api_error(status: int, message: str, code: str | None = None, headers: dict | None = None):
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}, \
        headers or {}


class ScriptedServer:
    """``responder(body, headers) -> (status, payload, extra headers)``; every request is recorded."""

    def __init__(self, responder):
        self.responder = responder
        self.requests: list[dict] = []
        self.auth_headers: list[str | None] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server names it so
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.requests.append(body)
                    outer.auth_headers.append(self.headers.get("Authorization"))
                    status, payload, extra = outer.responder(body, len(outer.requests))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(responder):
        servers.append(ScriptedServer(responder))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# --------------------------------------------------------------------------------------------------
# Data and the real Ray Serve server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hh_pairs():
    env = os.environ.get("APO_HH_DATA")
    path = Path(env) if env else ROOT.parent / "shared/data/hh-rlhf"
    if not path.exists():
        pytest.skip(f"HH-RLHF data not found at {path} (set APO_HH_DATA)")
    pairs, seen = [], set()
    for p in load_preference_pairs(path, limit=12):
        if p.prompt not in seen:
            seen.add(p.prompt)
            pairs.append(p)
    return pairs[:6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """Our own (transformers) server; Ray's vLLM app is tested in test_serve_llm.py."""
    ray = pytest.importorskip("ray")
    from apo_ray.serve import API_KEY_ENV, start_server, stop_server

    old_key = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = SERVE_KEY
    # Workers import apo_ray from this checkout (it need not be installed).
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        server = start_server(TINY, backend="transformers", port=_free_port(), max_new_tokens_cap=16,
                              max_body_bytes=64 << 10)
        yield server
        stop_server(server.app_name)
    finally:
        ray.shutdown()
        if old_key is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = old_key


@pytest.fixture(scope="module")
def server_url(served):
    return served.base_url


# --------------------------------------------------------------------------------------------------
# (a) the server speaks OpenAI
# --------------------------------------------------------------------------------------------------


def test_openai_client_against_ray_serve(server_url):
    client = openai.OpenAI(base_url=server_url, api_key=SERVE_KEY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=TINY, messages=messages, n=2, max_tokens=6, temperature=1.0,
                                       top_p=0.9, seed=7)
    assert r.object == "chat.completion" and r.model == TINY and r.id.startswith("chatcmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 2 * 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=TINY, messages=messages, n=2, max_tokens=6, temperature=1.0,
                                           top_p=0.9, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    capped = client.chat.completions.create(model=TINY, messages=messages, max_tokens=1000, temperature=0)
    assert capped.usage.completion_tokens <= 16  # max_new_tokens_cap

    assert [m.id for m in client.models.list().data] == [TINY]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(urllib.error.HTTPError) as err:  # no key at all
        urllib.request.urlopen(server_url + "/models", timeout=30)
    assert err.value.code == 401


def _post(url: str, body: bytes, key: str | None = SERVE_KEY):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_the_key_is_checked_before_the_body_and_guards_the_docs(served):
    chat = served.base_url + "/chat/completions"
    assert _post(chat, b"{not json", key=None)[0] == 401  # not 422: the body is never parsed without the key
    root = served.base_url[: -len("/v1")]
    for path in ("/docs", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(root + path, timeout=30)
        assert err.value.code == 401, path
        request = urllib.request.Request(root + path, headers={"Authorization": f"Bearer {SERVE_KEY}"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200, path


@pytest.mark.parametrize("field,value", [("n", 0), ("max_tokens", 0), ("max_tokens", -1),
                                         ("max_completion_tokens", 0), ("temperature", float("nan")),
                                         ("temperature", float("inf")), ("top_p", 1.5)])
def test_bad_sampling_fields_are_400_naming_the_field(served, field, value):
    body = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "hi"}], field: value}).encode()
    status, err = _post(served.base_url + "/chat/completions", body)
    assert status == 400 and err["error"]["param"] == field, (status, err)


def test_oversized_body_is_refused_before_generation(served):
    big = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "x" * (80 << 10)}]}).encode()
    status, err = _post(served.base_url + "/chat/completions", big)
    assert status == 413 and "bytes" in err["error"]["message"]


def test_chat_engine_refuses_instead_of_replacing_bad_values(tiny_model):
    from apo_ray.serve import ChatEngine, ChatRequestError

    engine = ChatEngine(TINY, max_new_tokens_cap=4)
    base = {"model": TINY, "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("n", 0), ("max_tokens", 0), ("temperature", float("nan"))):
        with pytest.raises(ChatRequestError) as err:
            engine.complete(base | {field: value})
        assert err.value.status == 400 and err.value.param == field


def test_each_server_is_its_own_app_and_stopping_it_spares_the_others(served):
    """A user's Serve app on the same cluster survives our stop (the judge used to call
    serve.shutdown(), which deletes every application)."""
    from ray import serve

    from apo_ray.serve import start_server, stop_server

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    def users_app(request) -> str:
        return "still here"

    serve.run(users_app.bind(), name="users-app", route_prefix="/users-app")
    port = served.base_url.split(":")[2].split("/")[0]
    try:
        second = start_server(TINY, backend="transformers", port=int(port), max_new_tokens_cap=4,
                              num_cpus_per_replica=0)
        assert second.app_name != served.app_name and second.base_url != served.base_url
        stop_server(second.app_name)
        apps = serve.status().applications
        assert "users-app" in apps and served.app_name in apps and second.app_name not in apps
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/users-app", timeout=30) as resp:
            assert resp.read() == b"still here"
    finally:
        serve.delete("users-app")


# --------------------------------------------------------------------------------------------------
# (b) the judge
# --------------------------------------------------------------------------------------------------

# pair i -> (judge's answer when ours is shown as [A], when ours is shown as [B])
JUDGE_SCRIPT = {
    0: ("[A] is better", "[B] is better"),  # win
    1: ("[B] is better", "equally good"),  # loss
    2: ("[A] is better", "[A] is better"),  # inconsistent: each order prefers the first reply
    3: ("equally bad", "**Equally good.**"),  # tie (markdown tolerated)
    4: ("I cannot decide.", "[A] is better"),  # invalid
    5: ("[A] is better", "equally good"),  # win
}
EXPECTED_OUTCOMES = ["win", "loss", "inconsistent", "tie", "invalid", "win"]
REPLY_RE = re.compile(r"### Reply \[A\]\n(\w+)-(\d+)\n\n### Reply \[B\]\n(\w+)-(\d+)$")


def judge_responder(secret: str):
    def respond(body, call_no):
        if call_no == 1:
            return api_error(429, "slow down", "rate_limit_exceeded", {"Retry-After": "0"})
        if call_no == 2:
            return api_error(500, "server hiccup")
        m = REPLY_RE.search(body["messages"][-1]["content"])
        first, i = m.group(1), int(m.group(2))
        verdict = JUDGE_SCRIPT[i][0 if first == "ours" else 1]
        return completion(f"Both replies address the question; weighing accuracy and tone.\n{verdict}")

    return respond


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_swaps_retries_caches_and_keeps_key_secret(scripted, tmp_path, monkeypatch):
    secret = "sk-test-DO-NOT-WRITE-4f9c1e"
    monkeypatch.setenv("APO_TEST_JUDGE_KEY", secret)
    server = scripted(judge_responder(secret))
    prompts = [f"\n\nHuman: question number {i}?\n\nAssistant:" for i in range(6)]
    ours = [f"ours-{i}" for i in range(6)]
    theirs = [f"theirs-{i}" for i in range(6)]
    cache = tmp_path / "judge_cache.jsonl"

    judge = JudgeClient(server.url, "scripted", api_key_env="APO_TEST_JUDGE_KEY", concurrency=3,
                        max_retries=3, backoff_s=0.01, cache_path=cache)
    records = judge.judge_pairs(prompts, ours, theirs)

    assert [r["outcome"] for r in records] == EXPECTED_OUTCOMES
    assert (records[0]["verdict_ours_as_a"], records[0]["verdict_ours_as_b"]) == ("A", "B")
    assert records[4]["raw_ours_as_a"].endswith("I cannot decide.")
    assert [r["key"] for r in records] == [query_key(p) for p in prompts]
    summary = summarize_records(records)
    assert {k: summary[k] for k in OUTCOMES} == {"win": 2, "tie": 1, "loss": 1, "inconsistent": 1, "invalid": 1}
    assert summary["n"] == 6 and summary["request_errors"] == 0
    assert summary["verdicts"] == {"A": 5, "B": 2, "same": 4, "invalid": 1}
    # each comparison asked in both orders; the prompt shows the dialogue and the instructions
    orders = Counter(REPLY_RE.search(b["messages"][-1]["content"]).group(1, 3) for b in server.requests[2:])
    assert orders == {("ours", "theirs"): 6, ("theirs", "ours"): 6}
    text = server.requests[-1]["messages"][-1]["content"]
    assert "User: question number" in text and "equally bad" in text and "harmless" in text
    assert server.requests[-1]["temperature"] == 0
    # the 429 and the 500 were retried
    assert len(server.requests) == 14 and judge.api.stats["retries"] == 2
    assert set(server.auth_headers) == {f"Bearer {secret}"}

    # a second client on the same cache asks nothing
    again = JudgeClient(server.url, "scripted", api_key_env="APO_TEST_JUDGE_KEY", cache_path=cache)
    assert [r["outcome"] for r in again.judge_pairs(prompts, ours, theirs)] == EXPECTED_OUTCOMES
    assert len(server.requests) == 14 and again.api.stats == {"requests": 0, "retries": 0, "cache_hits": 12,
                                                              "failures": 0}

    # the job: two response files in, summary + per-comparison records out, still from the cache
    for name, responses in (("ours", ours), ("theirs", theirs)):
        with open(tmp_path / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses))
    out_dir = tmp_path / "judge_out"
    job_summary = _load_job("judge").main([
        "--ours", str(tmp_path / "ours.jsonl"), "--theirs", str(tmp_path / "theirs.jsonl"),
        "--out-dir", str(out_dir), "--base-url", server.url, "--model", "scripted",
        "--api-key-env", "APO_TEST_JUDGE_KEY", "--cache", str(cache)])
    assert len(server.requests) == 14
    assert json.loads((out_dir / "summary.json").read_text())["win"] == job_summary["win"] == 2
    assert len((out_dir / "judgements.jsonl").read_text().splitlines()) == 6

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret in p.read_text()]
    assert secret not in repr(judge.api) and secret not in json.dumps(records)


def test_failed_requests_are_invalid_not_dropped(scripted):
    server = scripted(lambda body, n: api_error(400, "malformed"))
    judge = JudgeClient(server.url, "scripted", max_retries=2, backoff_s=0.01)
    records = judge.judge_pairs(["\n\nHuman: hi\n\nAssistant:"], ["a"], ["b"])
    assert records[0]["outcome"] == "invalid" and len(records[0]["errors"]) == 2
    assert len(server.requests) == 2  # 400 is not retried


# --------------------------------------------------------------------------------------------------
# (c) golden answers
# --------------------------------------------------------------------------------------------------

POLICY_MESSAGE = ("The response was filtered due to the prompt triggering content management policy. "
                  "Please modify your prompt and retry.")
REASON = "Because it could be used to hurt someone; instead you could talk to a counsellor or read up on safety."


def test_bare_refusal_detection():
    assert is_bare_refusal("Sorry, I can't assist with that.")
    assert is_bare_refusal("I cannot help with this request.")
    assert is_bare_refusal("I'm sorry.")
    assert not is_bare_refusal("Sure! Paris is the capital of France.")
    assert not is_bare_refusal("Sorry, I can't help with that, because sharing someone's home address "
                               "could put them in danger. You could try contacting them through a mutual friend.")


def test_golden_fallbacks_and_resume(scripted, tmp_path, hh_pairs):
    assert len(hh_pairs) == 6
    convs = [hh_to_messages(p.prompt) for p in hh_pairs]

    def which(body) -> int:
        msgs = body["messages"]
        assert msgs[0] == {"role": "system", "content": GOLDEN_SYSTEM_PROMPT}
        return next(i for i, c in enumerate(convs) if msgs[1:1 + len(c)] == c)

    def respond(body, call_no):
        i = which(body)
        why = body["messages"][-1] == {"role": "user", "content": WHY_TURN}
        if i == 0:
            return api_error(400, POLICY_MESSAGE, "content_filter")
        if i == 1:
            return completion(REASON if why else "Sorry, I can't assist with that.")
        if i == 2:
            return completion("Here is a careful, helpful answer.")
        if i == 3:
            return api_error(503, "overloaded")
        if i == 4:
            return completion("", finish_reason="content_filter")
        return completion("I'm sorry, I cannot help." if why else "Sorry, I won't help with that.")

    server = scripted(respond)
    out = tmp_path / "golden.jsonl"
    api = ChatAPI(server.url, "scripted", concurrency=2, max_retries=1, backoff_s=0.01, temperature=None)

    first = collect_golden_answers(hh_pairs, out, api, limit=3, seed=1)
    assert first["written"] == 3 and first["by_source"] == {"model": 1, "model+why": 1, "canned-refusal": 1,
                                                            "chosen-fallback": 0}
    with open(out, "a") as fh:  # a crash in the middle of writing the next answer
        fh.write('{"key": "0123456789abcdef", "prompt": "torn')
    second = collect_golden_answers(hh_pairs, out, api, limit=None, seed=1)
    assert second["skipped_existing"] == 3 and second["written"] == 3
    assert second["total_by_source"] == {"model": 1, "model+why": 1, "canned-refusal": 2, "chosen-fallback": 2}
    third = collect_golden_answers(hh_pairs, out, api, seed=1)
    assert third["written"] == 0 and third["skipped_existing"] == 6

    # every query asked once (+ its "why?" follow-up; + retries for the failing one), never re-asked
    asks = Counter((which(b), b["messages"][-1]["content"] == WHY_TURN) for b in server.requests)
    assert asks == {(0, False): 1, (1, False): 1, (1, True): 1, (2, False): 1, (3, False): 2, (4, False): 1,
                    (5, False): 1, (5, True): 1}
    follow_up = next(b for b in server.requests if b["messages"][-1]["content"] == WHY_TURN)
    assert follow_up["messages"][-2] == {"role": "assistant", "content": "Sorry, I can't assist with that."}
    assert "temperature" not in follow_up

    answers = {query_key(a.prompt): a for a in load_golden_answers(out)}
    assert len(answers) == 6
    got = [answers[query_key(p.prompt)] for p in hh_pairs]
    assert [a.source for a in got] == ["canned-refusal", "model+why", "model", "chosen-fallback",
                                       "canned-refusal", "chosen-fallback"]
    assert got[0].response == canned_refusal(query_key(hh_pairs[0].prompt), seed=1) in CANNED_REFUSALS
    assert got[1].response == f"Sorry, I can't assist with that. {REASON}"
    assert got[2].response == "Here is a careful, helpful answer."
    assert got[3].response == hh_pairs[3].chosen and got[5].response == hh_pairs[5].chosen


def test_golden_and_judge_against_ray_serve(server_url, hh_pairs, tmp_path):
    pairs = hh_pairs[:2]
    out = tmp_path / "golden_tiny.jsonl"
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    summary = _load_job("golden").main([
        "--data", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--base-url", server_url, "--model", TINY,
        "--api-key-env", "APO_SERVE_API_KEY", "--max-tokens", "12", "--concurrency", "2",
        "--temperature", "1.0"])
    assert summary["by_source"]["model"] == 2, summary
    answers = load_golden_answers(out)
    assert {a.source for a in answers} == {"model"} and all(a.response for a in answers)

    judge = JudgeClient(server_url, TINY, api_key_env="APO_SERVE_API_KEY", concurrency=2, max_tokens=8,
                        max_retries=1, backoff_s=0.01)
    by_prompt = {a.prompt: a.response for a in answers}
    records = judge.judge_pairs([p.prompt for p in pairs], [by_prompt[p.prompt] for p in pairs],
                                [p.chosen for p in pairs])
    totals = summarize_records(records)
    print("golden by source:", summary["by_source"], "| judge:", {k: totals[k] for k in OUTCOMES},
          "verdicts:", totals["verdicts"])
    assert totals["n"] == 2 and totals["request_errors"] == 0
    assert all(isinstance(r["raw_ours_as_a"], str) and r["outcome"] in OUTCOMES for r in records)

