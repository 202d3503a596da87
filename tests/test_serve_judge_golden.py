"""OpenAI-compatible serving on Ray Serve, the pairwise LLM judge and golden-answer collection.

Two servers:
- the real one (:func:`apo_ray.llm_api.server.start_server` on a local Ray, tiny random Llama): plumbing and
  schema, and end-to-end judge/golden runs (its text is random, so its verdicts are "invalid");
- a scripted OpenAI-compatible HTTP server defined here, that returns canned texts and errors, to
  test the judge's and the collector's logic: swaps, retries, cache, refusals, resume.
"""

from __future__ import annotations

import importlib.util
import json
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
from serving import post, server_on_local_ray

from apo_ray.core.metrics import OUTCOMES
from apo_ray.data import load_golden_answers, load_preference_pairs, query_key
from apo_ray.llm_api.golden import (
    CANNED_REFUSALS,
    GOLDEN_SYSTEM_PROMPT,
    WHY_TURN,
    canned_refusal,
    collect_golden_answers,
    is_bare_refusal,
)
from apo_ray.llm_api.judge import (
    ChatAPI,
    JudgeClient,
    JudgeError,
    cache_key,
    judge_messages,
    summarize_records,
)
from apo_ray.models.loading import hh_to_messages

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
def hh_pairs(hh_data_path):
    pairs, seen = [], set()
    for p in load_preference_pairs(hh_data_path, limit=12):
        if p.prompt not in seen:
            seen.add(p.prompt)
            pairs.append(p)
    return pairs[:6]


@pytest.fixture(scope="module")
def served():
    """Our own (transformers) server; Ray's vLLM app is tested in test_serve_llm.py."""
    pytest.importorskip("ray")
    with server_on_local_ray(TINY, SERVE_KEY, backend="transformers", max_new_tokens_cap=16,
                             max_body_bytes=64 << 10) as server:
        yield server


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
    return post(url, body, key)


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
    from apo_ray.llm_api.server import ChatEngine, ChatRequestError

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

    from apo_ray.llm_api.server import start_server, stop_server

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
    judge = JudgeClient(server.url, "scripted", max_retries=2, backoff_s=0.01, max_failed_fraction=1.0)
    records = judge.judge_pairs(["\n\nHuman: hi\n\nAssistant:"], ["a"], ["b"])
    assert records[0]["outcome"] == "invalid" and records[0]["errors"] == ["BadRequestError (HTTP 400)"] * 2
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
    assert second["skipped_existing"] == 3 and second["written"] == 2
    assert second["failed"] == 1 and second["failed_by_error"] == {"InternalServerError (HTTP 503)": 1}
    assert second["total_by_source"] == {"model": 1, "model+why": 1, "canned-refusal": 2, "chosen-fallback": 1}
    third = collect_golden_answers(hh_pairs, out, api, seed=1)  # only the failed query is asked again
    assert third["written"] == 0 and third["skipped_existing"] == 5 and third["failed"] == 1

    # every answered query asked once (+ its "why?" follow-up), never re-asked; the failing one
    # (503 after its retry) in each run, since a failure is not final
    asks = Counter((which(b), b["messages"][-1]["content"] == WHY_TURN) for b in server.requests)
    assert asks == {(0, False): 1, (1, False): 1, (1, True): 1, (2, False): 1, (3, False): 4, (4, False): 1,
                    (5, False): 1, (5, True): 1}
    follow_up = next(b for b in server.requests if b["messages"][-1]["content"] == WHY_TURN)
    assert follow_up["messages"][-2] == {"role": "assistant", "content": "Sorry, I can't assist with that."}
    assert "temperature" not in follow_up

    answers = {query_key(a.prompt): a for a in load_golden_answers(out)}
    assert len(answers) == 5 and query_key(hh_pairs[3].prompt) not in answers
    got = [answers.get(query_key(p.prompt)) for p in hh_pairs]
    assert [a and a.source for a in got] == ["canned-refusal", "model+why", "model", None,
                                             "canned-refusal", "chosen-fallback"]
    assert got[0].response == canned_refusal(query_key(hh_pairs[0].prompt), seed=1) in CANNED_REFUSALS
    assert got[1].response == f"Sorry, I can't assist with that. {REASON}"
    assert got[2].response == "Here is a careful, helpful answer."
    assert got[5].response == hh_pairs[5].chosen


def test_golden_and_judge_against_ray_serve(server_url, hh_pairs, tmp_path):
    out = tmp_path / "golden_tiny.jsonl"
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                      for p in hh_pairs)
    summary = _load_job("golden").main([
        "--out", str(out), "--base-url", server_url, "--model", TINY,
        "--api-key-env", "APO_SERVE_API_KEY", "--max-tokens", "12", "--concurrency", "2", "--temperature", "1.0",
        "experiment=smoke", f"data.path={tmp_path / 'pairs.jsonl'}", "data.rm_pairs=2", "data.llm_queries=2",
        "data.dev_pairs=0", "data.test_pairs=2"])
    assert summary["golden_queries"] == 2 and summary["by_source"]["model"] == 2, summary
    answers = load_golden_answers(out)
    assert {a.source for a in answers} == {"model"} and all(a.response for a in answers)
    by_prompt = {a.prompt: a.response for a in answers}
    pairs = [p for p in hh_pairs if p.prompt in by_prompt]
    assert len(pairs) == 2

    judge = JudgeClient(server_url, TINY, api_key_env="APO_SERVE_API_KEY", concurrency=2, max_tokens=8,
                        max_retries=1, backoff_s=0.01)
    records = judge.judge_pairs([p.prompt for p in pairs], [by_prompt[p.prompt] for p in pairs],
                                [p.chosen for p in pairs])
    totals = summarize_records(records)
    print("golden by source:", summary["by_source"], "| judge:", {k: totals[k] for k in OUTCOMES},
          "verdicts:", totals["verdicts"])
    assert totals["n"] == 2 and totals["request_errors"] == 0
    assert all(isinstance(r["raw_ours_as_a"], str) and r["outcome"] in OUTCOMES for r in records)



def test_golden_job_and_game_agree_on_the_golden_queries(scripted, tmp_path):
    """jobs/golden.py, given the run's overrides, answers exactly the golden queries the game then
    uses; a file collected for another split (another data.seed) leaves the game with fallbacks,
    and the game says how many."""
    from apo_ray.config import compose
    from apo_ray.game.game_data import build_game_data
    server = scripted(lambda body, call_no: completion(f"Golden answer {call_no}."))
    overrides = ["experiment=smoke", "data.gold_queries=5"]
    job = _load_job("golden")
    args = ["--base-url", server.url, "--model", "scripted", "--max-retries", "1", "--concurrency", "2"]
    out = tmp_path / "gold.jsonl"
    summary = job.main(["--out", str(out), *args, *overrides])
    assert summary["golden_queries"] == 5 and summary["by_source"]["model"] == 5

    cfg = compose([*overrides, f"data.golden_path={out}"])
    data = build_game_data(cfg)
    file_prompts = [a.prompt for a in load_golden_answers(out)]
    assert sorted(g.prompt for g in data.gold) == sorted(file_prompts) and len(set(file_prompts)) == 5
    assert [g.source for g in data.gold] == ["model"] * 5
    assert data.gold_counts == {"from_file": 5, "fell_back_to_chosen": 0, "file_sources": {"model": 5},
                                "file_answers_not_used": 0}
    assert data.gold_source.startswith("file: 5 answers, 0 fell back to chosen")

    other = tmp_path / "gold_seed1.jsonl"
    job.main(["--out", str(other), *args, *overrides, "data.seed=1"])
    cfg.data.golden_path = str(other)
    mismatched = build_game_data(cfg)
    assert mismatched.gold_counts["fell_back_to_chosen"] >= 4  # (at most one prompt in common by chance)
    assert mismatched.gold_source.startswith(f"file: {5 - mismatched.gold_counts['fell_back_to_chosen']} answers, "
                                             f"{mismatched.gold_counts['fell_back_to_chosen']} fell back to chosen")
    assert [g.prompt for g in mismatched.gold] == [g.prompt for g in data.gold]  # the game's queries did not move
# --------------------------------------------------------------------------------------------------
# (d) endpoints that fail: nothing transient is final, failures are loud, no provider text on disk
# --------------------------------------------------------------------------------------------------

LEAKED = "sk-leak-7f3a9c01"  # a provider's error message that echoes part of the key


def _closed_port_url() -> str:
    with socket.socket() as s:  # bound, then closed: nothing listens there, connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


FAILING = {
    "401": (lambda body, n: api_error(401, f"Incorrect API key provided: {LEAKED}.", "invalid_api_key"),
            "AuthenticationError (HTTP 401)"),
    "429": (lambda body, n: api_error(429, f"You exceeded your current quota (key {LEAKED})", "insufficient_quota",
                                      {"Retry-After": "0"}), "RateLimitError (HTTP 429)"),
    "500": (lambda body, n: api_error(500, f"internal error for key {LEAKED}"), "InternalServerError (HTTP 500)"),
    "refused": (None, "APIConnectionError"),
}


def _write_pairs(path: Path, pairs) -> Path:
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                      for p in pairs)
    return path


def _golden_config(tmp_path: Path, n_gold: int) -> tuple[list[str], list]:
    """Overrides that give a run exactly ``n_gold`` golden queries from a small data file, and those
    queries' pairs, in the order jobs/golden.py asks them (the game's own split)."""
    from apo_ray.config import compose
    from apo_ray.data import golden_query_pairs, load_apo_splits, load_preference_pairs

    # (this module's hh_pairs fixture holds only 6 pairs: take distinct prompts from the shipped set)
    pool = load_preference_pairs("embedded:hh-rlhf-harmless-test", limit=200)
    distinct = list({p.prompt: p for p in pool}.values())[: n_gold + 3]
    data = _write_pairs(tmp_path / "pairs.jsonl", distinct)
    overrides = ["experiment=smoke", f"data.path={data}", f"data.rm_pairs={n_gold}", "data.llm_queries=2",
                 "data.dev_pairs=1", "data.test_pairs=1", "data.eval_rm_pairs=0"]
    return overrides, golden_query_pairs(load_apo_splits(compose(overrides).data), None)


def _no_leak(folder: Path) -> None:
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert LEAKED not in p.read_text(errors="replace"), p


@pytest.mark.parametrize("failure", sorted(FAILING))
def test_golden_transient_failures_are_retried_next_run_not_final(failure, scripted, tmp_path, hh_pairs):
    """Connection refused, 401, 429 after retries, 500: nothing written as final, counted, the job
    exits non-zero (all failed); the next run against a working endpoint asks those queries again."""
    responder, expected = FAILING[failure]
    url = scripted(responder).url if responder else _closed_port_url()
    overrides, _ = _golden_config(tmp_path, 3)
    out = tmp_path / "gold.jsonl"
    args = ["--out", str(out), "--model", "m", "--max-retries", "1", "--concurrency", "3"]
    with pytest.raises(SystemExit) as stop:
        _load_job("golden").main([*args, "--base-url", url, *overrides])
    assert "3 of 3 queries failed" in str(stop.value) and expected in str(stop.value)
    assert not out.exists() or out.read_text() == ""  # no chosen-fallback written for a failure

    good = scripted(lambda body, n: completion("A real, helpful answer."))
    summary = _load_job("golden").main([*args, "--base-url", good.url, *overrides])
    assert summary["asked"] == 3 and summary["failed"] == 0 and summary["by_source"]["model"] == 3
    assert {a.source for a in load_golden_answers(out)} == {"model"}
    _no_leak(tmp_path)


def test_golden_some_failures_exit_zero_and_old_error_fallbacks_are_asked_again(scripted, tmp_path, hh_pairs):
    overrides, pairs = _golden_config(tmp_path, 4)
    flaky_prompt = hh_to_messages(pairs[0].prompt)[-1]["content"]

    def respond(body, n):
        if body["messages"][-1]["content"] == flaky_prompt:
            return api_error(503, f"overloaded ({LEAKED})")
        if body["messages"][-1]["content"] == hh_to_messages(pairs[1].prompt)[-1]["content"]:
            return api_error(400, f"{POLICY_MESSAGE} {LEAKED}", "content_filter")
        return completion("A real answer.")

    server = scripted(respond)
    out = tmp_path / "gold.jsonl"
    # a file from an older version: a connection error recorded as a final chosen-fallback
    out.write_text(json.dumps({"key": query_key(pairs[2].prompt), "prompt": pairs[2].prompt,
                               "response": pairs[2].chosen, "source": "chosen-fallback",
                               "note": "APIConnectionError: Connection error."}) + "\n")
    summary = _load_job("golden").main(["--out", str(out), "--base-url", server.url, "--model", "m",
                                        "--max-retries", "0", *overrides])
    # 1 of 4 failed: not "most", so the job succeeds; the old error row was asked again
    assert summary["asked"] == 4 and summary["failed"] == 1 and summary["written"] == 3
    answers = {query_key(a.prompt): a for a in load_golden_answers(out)}  # a later line wins
    assert answers[query_key(pairs[2].prompt)].source == "model"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    refusal = next(r for r in rows if r["source"] == "canned-refusal")
    assert refusal["note"] == "content policy refusal: BadRequestError (HTTP 400)"
    _no_leak(tmp_path)


@pytest.mark.parametrize("failure", ["401", "refused"])
def test_judge_fails_loudly_when_requests_fail(failure, scripted, tmp_path):
    responder, expected = FAILING[failure]
    url = scripted(responder).url if responder else _closed_port_url()
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(3)]
    judge = JudgeClient(url, "m", max_retries=0, backoff_s=0.01)
    with pytest.raises(JudgeError, match=rf"6 of 6 requests .* failed .*{re.escape(expected)}: 6") as err:
        judge.judge_pairs(prompts, ["a"] * 3, ["b"] * 3)
    assert len(err.value.records) == 3 and all(r["outcome"] == "invalid" for r in err.value.records)

    # the job: records written, exit status non-zero, no provider text on disk
    for name, text in (("ours", "a"), ("theirs", "b")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p, "response": text}) + "\n"
                                                        for p in prompts))
    with pytest.raises(SystemExit) as stop:
        _load_job("judge").main(["--ours", str(tmp_path / "ours.jsonl"), "--theirs", str(tmp_path / "theirs.jsonl"),
                                 "--out-dir", str(tmp_path / "out"), "--base-url", url, "--model", "m",
                                 "--max-retries", "0"])
    assert expected in str(stop.value)
    records = [json.loads(line) for line in (tmp_path / "out" / "judgements.jsonl").read_text().splitlines()]
    assert [r["errors"] for r in records] == [[expected, expected]] * 3
    if responder:
        _no_leak(tmp_path)


def test_judge_below_the_threshold_counts_failures_as_invalid(scripted):
    server = scripted(lambda body, n: api_error(500, "boom") if n == 1 else completion("[A] is better"))
    judge = JudgeClient(server.url, "m", max_retries=0, concurrency=1, max_failed_fraction=0.5)
    records = judge.judge_pairs(["\n\nHuman: q?\n\nAssistant:"] * 2, ["a", "c"], ["b", "d"])
    assert summarize_records(records)["request_errors"] == 1  # 1 of 4 failed: counted, not fatal


def test_judge_cache_skips_and_reasks_bad_rows(scripted, tmp_path, caplog):
    server = scripted(lambda body, n: completion("Fine.\n[A] is better"))
    prompts = [f"\n\nHuman: cached question {i}?\n\nAssistant:" for i in range(4)]
    key = [cache_key("m", judge_messages(p, "ours", "theirs"), 0.0, None) for p in prompts]
    cache = tmp_path / "cache.jsonl"
    with open(cache, "wb") as fh:
        fh.write(json.dumps({"key": key[0], "text": "Good.\n[B] is better", "finish_reason": "stop"}).encode() + b"\n")
        fh.write(json.dumps({"key": key[1], "text": None, "finish_reason": "stop"}).encode() + b"\n")  # null text
        fh.write(b'{"key": "' + key[2].encode() + b'", "text": "\xff\xfe not utf-8"}\n')  # not UTF-8
        fh.write(json.dumps({"key": key[3], "finish_reason": "stop"}).encode() + b"\n")  # no text
    judge = JudgeClient(server.url, "m", max_retries=0, cache_path=cache, concurrency=1)
    assert judge.api.cache.skipped == 3 and f"{cache}: skipped 3 unreadable answer line(s) (line 2, 3, 4)" in caplog.text
    records = judge.judge_pairs(prompts, ["ours"] * 4, ["theirs"] * 4)
    # question 0 in the [A] order came from the cache; the three bad rows and the 4 swapped orders were asked
    assert judge.api.stats["cache_hits"] == 1 and len(server.requests) == 7
    assert records[0]["verdict_ours_as_a"] == "B" and all(r["verdict_ours_as_a"] == "A" for r in records[1:])
    again = JudgeClient(server.url, "m", cache_path=cache)  # the re-asked answers are now cached
    assert again.api.cache.skipped == 3 and len(again.api.cache) == 8


def test_main_job_judge_fails_loudly(scripted, tmp_path, hh_data_path):
    """``eval.judge`` against an endpoint that refuses every request: the run stops with a
    JudgeError naming the arm and the error kind (jobs/apo.py prints it), not a table of invalids."""
    from apo_ray.config import Config
    from apo_ray.game.store import PhaseStore
    from apo_ray.runtime.launch import USER_ERRORS, judge_final_policies

    server = scripted(FAILING["401"][0])
    cfg = Config()
    cfg.data.path = str(hh_data_path)
    cfg.data.rm_pairs, cfg.data.llm_queries, cfg.data.dev_pairs, cfg.data.test_pairs = 8, 6, 2, 6
    cfg.apo.rounds, cfg.apo.arms = 1, ["fixed", "apo"]
    cfg.eval.judge, cfg.eval.judge_base_url, cfg.eval.judge_model, cfg.eval.judge_pairs = True, server.url, "m", 3
    cfg.run.output_dir = str(tmp_path)
    store = PhaseStore(tmp_path / "phases", system=None)
    for arm in ("fixed", "apo"):
        store.put(f"samples/policy/{arm}/r1/test", [[f"{arm} answer {i}"] for i in range(6)])
    records = [{"round": 1, "rm_mode": arm, "policy": f"policy/{arm}/r1"} for arm in ("fixed", "apo")]
    with pytest.raises(JudgeError, match=r"eval.judge, arm apo: judge: 6 of 6 requests .*AuthenticationError") as err:
        judge_final_policies(cfg, records)
    assert isinstance(err.value, USER_ERRORS)
    written = [json.loads(line) for line in (tmp_path / "judge" / "apo.jsonl").read_text().splitlines()]
    assert len(written) == 3 and not (tmp_path / "judge_summary.json").exists()
    _no_leak(tmp_path / "judge")
