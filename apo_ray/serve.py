"""An OpenAI-compatible chat-completions server for a local HF causal LM, on Ray Serve.

Why: the judge (:mod:`apo_ray.judge`) and the golden-answer collector (:mod:`apo_ray.golden`) talk to
any OpenAI-compatible endpoint. Serving our own policy (or SmolLM2) behind the same API lets them run
offline, in tests and CI, and lets a trained policy be judged or queried like any hosted model.

Layers:
- :class:`ChatEngine` (layer 2, no Ray): turns an OpenAI chat request (a dict) into a response dict
  with transformers ``generate``; testable on its own.
- :class:`ChatServer` (layer 3): a Ray Serve deployment with a FastAPI ingress exposing
  ``POST /v1/chat/completions`` and ``GET /v1/models``.
- :func:`start_server` / :func:`stop_server`: start Serve on the current (or a new local) Ray.

Supported request fields: ``model``, ``messages`` (string or text-part content), ``temperature``
(0 = greedy), ``top_p``, ``max_tokens`` / ``max_completion_tokens`` (capped by
``max_new_tokens_cap``), ``n``, ``seed``, ``stop``. Other OpenAI fields are accepted and ignored;
``stream=true`` is refused. If ``$APO_SERVE_API_KEY`` is set when the server starts, requests must
send it as ``Authorization: Bearer <key>``; only its SHA-256 travels to the replicas.

Launch: ``python jobs/serve.py --model smollm2-135m-instruct --port 8000``, then point any OpenAI
client at ``http://127.0.0.1:8000/v1``.
"""

# No `from __future__ import annotations` here: FastAPI must see the real body type, not a string
# (with string annotations under Serve's class-based view the body is mistaken for a query parameter).

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from ray import serve

log = logging.getLogger(__name__)

API_KEY_ENV = "APO_SERVE_API_KEY"
DEFAULT_APP_NAME = "apo-chat"
DEFAULT_MAX_TOKENS = 256  # when a request names no max_tokens (still capped by max_new_tokens_cap)


class ChatRequestError(Exception):
    """A request the server refuses; rendered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
        model: anything :func:`apo_ray.models.resolve_model` takes.
        served_name: the id clients put in ``model`` (default: ``model``).
        max_new_tokens_cap: upper bound on ``max_tokens``.
        max_prompt_tokens: prompts are left-truncated (oldest turns go first) to this many tokens.
    """

    def __init__(self, model: str, *, served_name: str | None = None, max_new_tokens_cap: int = 512,
                 max_prompt_tokens: int = 2048, dtype: str = "auto", device: str | None = None):
        import torch

        from apo_ray.models import load_policy, load_tokenizer, resolve_model

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

    def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI ``chat.completion`` dict for an OpenAI request dict (raises ChatRequestError)."""
        model = request.get("model")
        if model not in self.accepted_names:
            raise ChatRequestError(404, f"model {model!r} is not served here; use {self.served_name!r}",
                                   code="model_not_found", param="model")
        if request.get("stream"):
            raise ChatRequestError(400, "stream=true is not supported by this server", param="stream")
        messages = request.get("messages") or []
        if not messages:
            raise ChatRequestError(400, "messages must not be empty", param="messages")
        n = int(request.get("n") or 1)
        if not 1 <= n <= 16:
            raise ChatRequestError(400, f"n must be in [1, 16], got {n}", param="n")
        temperature = request.get("temperature")
        temperature = 1.0 if temperature is None else float(temperature)
        top_p = request.get("top_p")
        top_p = 1.0 if top_p is None else float(top_p)
        if temperature < 0 or not 0 < top_p <= 1:
            raise ChatRequestError(400, "temperature must be >= 0 and top_p in (0, 1]", param="temperature")
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_MAX_TOKENS
        max_tokens = max(1, min(int(max_tokens), self.max_new_tokens_cap))
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)

        chat = [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))} for m in messages]
        prompt_ids = self._encode(chat)
        texts, finishes, completion_tokens = self._generate(prompt_ids, n, temperature, top_p, max_tokens,
                                                            request.get("seed"))
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
                  seed: int | None) -> tuple[list[str], list[str], int]:
        import torch

        greedy = temperature == 0.0
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": self.eos_ids,
                                  "pad_token_id": self.tokenizer.pad_token_id, "do_sample": not greedy}
        if greedy:
            kwargs.update(num_return_sequences=1)
        else:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
        input_ids = torch.tensor([prompt_ids], device=self.device)
        with self._lock, torch.no_grad():
            torch.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(4), "little"))
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
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


# --- Ray Serve layer -------------------------------------------------------------------------------

app = FastAPI(title="apo_ray chat completions")


class ChatCompletionRequest(BaseModel):
    """The OpenAI request body; unknown fields (penalties, logit_bias, user, ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@serve.deployment(name="ChatServer")
@serve.ingress(app)
class ChatServer:
    """Ray Serve replica: one :class:`ChatEngine` behind FastAPI routes."""

    def __init__(self, model: str, *, served_name: str | None = None, max_new_tokens_cap: int = 512,
                 dtype: str = "auto", api_key_sha256: str | None = None):
        self.engine = ChatEngine(model, served_name=served_name, max_new_tokens_cap=max_new_tokens_cap,
                                 dtype=dtype)
        own_key = os.environ.get(API_KEY_ENV)
        self.key_hash = api_key_sha256 or (_key_hash(own_key) if own_key else None)

    def _auth_error(self, authorization: str | None) -> JSONResponse | None:
        if self.key_hash is None:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(_key_hash(token.strip()), self.key_hash):
            return None
        err = ChatRequestError(401, "missing or wrong API key", code="invalid_api_key",
                               kind="authentication_error")
        return JSONResponse(err.body(), status_code=401)

    @app.get("/v1/models")
    async def list_models(self, authorization: str | None = Header(default=None)):
        return self._auth_error(authorization) or self.engine.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest,
                               authorization: str | None = Header(default=None)):
        denied = self._auth_error(authorization)
        if denied is not None:
            return denied
        try:
            return await asyncio.to_thread(self.engine.complete, body.model_dump())
        except ChatRequestError as err:
            return JSONResponse(err.body(), status_code=err.status)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


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


def start_server(model: str = "smollm2-135m-instruct", *, port: int = 8000, host: str = "127.0.0.1",
                 route_prefix: str = "/", num_replicas: int = 1, max_new_tokens_cap: int = 512,
                 served_name: str | None = None, app_name: str = DEFAULT_APP_NAME, dtype: str = "auto",
                 num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0,
                 ready_timeout_s: float = 300.0) -> str:
    """Serve ``model`` over HTTP with Ray Serve; returns the OpenAI base URL (``http://host:port/.../v1``).

    Uses the Ray already initialised in this process, or starts a local one. Serve's HTTP options are
    cluster-wide and fixed once Serve runs: call :func:`stop_server` first to move it to another port.
    """
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    api_key = os.environ.get(API_KEY_ENV) or None
    deployment = ChatServer.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
    )
    application = deployment.bind(model, served_name=served_name or model, max_new_tokens_cap=max_new_tokens_cap,
                                  dtype=dtype, api_key_sha256=_key_hash(api_key) if api_key else None)
    serve.run(application, name=app_name, route_prefix=route_prefix)
    prefix = "" if route_prefix in ("", "/") else "/" + route_prefix.strip("/")
    base_url = f"http://{_client_host(host)}:{port}{prefix}/v1"
    _wait_ready(base_url, api_key, ready_timeout_s)
    log.info("serving %s at %s (%d replica(s), auth %s)", model, base_url, num_replicas,
             "on" if api_key else "off")
    return base_url


def stop_server(app_name: str | None = None) -> None:
    """Delete one Serve application, or (default) shut Serve down entirely; Ray itself stays up."""
    if app_name is None:
        serve.shutdown()
    else:
        serve.delete(app_name)
