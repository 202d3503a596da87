"""Generators: S sampled responses per prompt from the current policy (layer 2, one process).

Two backends share one interface (``generate(prompts, n, seed) -> list[list[str]]`` and
``load_weights(state_dict)``):
- :class:`HFGenerator`: transformers ``generate`` with left padding and length bucketing, CPU or GPU.
- :class:`VLLMGenerator`: vLLM's offline ``LLM`` engine (optional extra ``vllm``). It cannot run on
  the machines this project is developed on; it is written to vLLM's documented API and untested here.

Prompts are raw HH dialogues; the generator applies the model's chat template and left-truncates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apo_ray.models import format_prompt, load_policy, load_tokenizer

if TYPE_CHECKING:
    from apo_ray.config import Config

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: GenerationStats) -> None:
        self.sequences += other.sequences
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds


class HFGenerator:
    """Sampling with transformers ``generate``; prompts sorted by length so batches pad little."""

    def __init__(self, model: str, *, max_new_tokens: int = 64, max_prompt_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, prompts_per_batch: int = 16,
                 seed: int = 0, dtype: str = "float32", device: str | None = None, fast: bool = False,
                 share_prefill: bool = True, **_ignored):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # fast: on CUDA, sample with apo_ray.fastgen.FastSampler (static KV cache + CUDA graphs).
        self.fast = fast and self.device.startswith("cuda")
        self._sampler = None
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model = load_policy(model, dtype=dtype, device=self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.prompts_per_batch = prompts_per_batch
        self.seed = seed
        self.share_prefill = share_prefill  # prefill each prompt once for its n samples
        self.last_stats = GenerationStats()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [row[-self.max_prompt_tokens:] for row in ids]  # keep the latest turns

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, seed: int | None = None) -> list[list[str]]:
        """``n`` samples for each prompt, in prompt order. The same ``seed`` and prompts give the
        same samples (each length-sorted batch is seeded from ``seed`` and its position)."""
        start = time.perf_counter()
        seed = self.seed if seed is None else seed
        ids = self._prompt_ids(prompts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: list[list[str]] = [[] for _ in prompts]
        pad = self.tokenizer.pad_token_id
        stats = GenerationStats()
        for batch_no, lo in enumerate(range(0, len(order), self.prompts_per_batch)):
            chunk = order[lo:lo + self.prompts_per_batch]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in chunk], device=self.device)
            attention = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in chunk],
                                     device=self.device)
            torch.manual_seed(seed * 1_000_003 + batch_no)
            if self.fast:
                new = self._fast_generate(input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0))
            else:
                shared = {}
                if self.share_prefill and n > 1 and width > 1:
                    shared["past_key_values"] = self._shared_prefill(input_ids, attention, n)
                    input_ids, attention = input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)
                sampled = self.model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=self.max_new_tokens,
                    do_sample=self.temperature > 0, temperature=self.temperature or None,
                    top_p=self.top_p, top_k=0,  # only the configured warpers (HF adds top-k 50 otherwise)
                    num_return_sequences=1 if shared else n, pad_token_id=pad,
                    eos_token_id=self.tokenizer.eos_token_id, **shared,
                )  # [len(chunk) * n, width + new], samples of one prompt adjacent
                new = sampled[:, width:]
            stats.new_tokens += int((new != pad).sum())
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for j, i in enumerate(chunk):
                out[i] = [t.strip() for t in texts[j * n:(j + 1) * n]]
        stats.sequences = len(prompts) * n
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return out

    def _shared_prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, n: int):
        """The KV cache of every prompt but its last token, computed once and repeated for its ``n``
        samples. ``generate`` with ``num_return_sequences=n`` would prefill n copies of each prompt;
        prompts are usually longer than the responses, so that was most of the sampling work.

        input_ids, attention: [B, W] left-padded. Returns a cache of [B * n] rows and W - 1 positions;
        ``generate`` then runs the last prompt token itself and samples from its logits. Positions
        follow ``generate``'s own rule for left padding (count of real tokens so far)."""
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
        out = self.model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1],
                         position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        return cache

    def _fast_generate(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        from apo_ray.fastgen import FastSampler

        rows = input_ids.shape[0]
        if self._sampler is None or self._sampler.max_batch < rows:
            self._sampler = FastSampler(self.model, max_batch=rows,
                                        max_len=self.max_prompt_tokens + self.max_new_tokens)
        return self._sampler.generate(  # the same warpers as the generate call above (no top-k)
            input_ids, attention, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=0,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)


def _load_weights_on_vllm_worker(worker, weights):
    """Runs inside each vLLM worker via ``LLM.collective_rpc``: hand the tensors to the model's own
    ``load_weights`` (which knows its fused/sharded parameter layout)."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMGenerator:
    """vLLM offline engine; n samples per prompt come from one request (``SamplingParams.n``).
    Untested here: vLLM needs a GPU and its own torch build."""

    def __init__(self, model: str, *, max_new_tokens: int = 64, max_prompt_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 dtype: str = "bfloat16", engine_kwargs: dict | None = None, **_ignored):
        try:
            import vllm
        except ImportError as err:  # pragma: no cover - depends on the optional extra
            raise RuntimeError("generation.backend=vllm needs the optional extra: pip install 'apo-ray[vllm]'") from err
        from apo_ray.models import resolve_model

        self._vllm = vllm
        path = resolve_model(model)
        self.tokenizer = load_tokenizer(path)
        self.llm = vllm.LLM(model=path, dtype=dtype, seed=seed, **(engine_kwargs or {}))
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.last_stats = GenerationStats()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc(_load_weights_on_vllm_worker, args=(list(state_dict.items()),))
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights

    def generate(self, prompts: list[str], n: int, seed: int | None = None) -> list[list[str]]:
        start = time.perf_counter()
        ids = [row[-self.max_prompt_tokens:] for row in self.tokenizer(
            [format_prompt(self.tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]]
        params = self._vllm.SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                           max_tokens=self.max_new_tokens,
                                           seed=self.seed if seed is None else seed)
        results = self.llm.generate([{"prompt_token_ids": row} for row in ids], params)
        out = [[c.text.strip() for c in r.outputs] for r in results]
        self.last_stats = GenerationStats(
            sequences=len(prompts) * n, seconds=time.perf_counter() - start,
            new_tokens=sum(len(c.token_ids) for r in results for c in r.outputs))
        return out


def make_generator(backend: str, model: str, **kwargs):
    if backend == "transformers":
        return HFGenerator(model, **kwargs)
    if backend == "vllm":
        return VLLMGenerator(model, **kwargs)
    raise ValueError(f"generation.backend must be 'transformers' or 'vllm', got {backend!r}")


def generator_from_config(cfg: Config):
    """The generator ``cfg.generation`` / ``cfg.model.policy`` describe, with the pretrained weights."""
    g = cfg.generation
    return make_generator(g.backend, cfg.model.policy, max_new_tokens=g.max_new_tokens,
                          max_prompt_tokens=g.max_prompt_tokens, temperature=g.temperature, top_p=g.top_p,
                          prompts_per_batch=g.prompts_per_batch, seed=g.seed, dtype=cfg.model.dtype,
                          fast=g.fast_sampler, engine_kwargs=dict(g.engine_kwargs))
