"""Hidden states of the frozen lower blocks, computed once per text and shared by every RM.

With ``rm.trainable_layers = t`` (the CPU presets) every RM of a run -- RM_Base, the evaluation
RMs, each arm's RM of each round -- starts from the pretrained backbone and trains only its top t
blocks (+ norm and head); its input embedding and lower L - t blocks stay the pretrained ones. The
hidden state after block L - t of a token sequence is therefore the same for all of them, and for
every seed. :class:`FrozenPrefixCache` keeps it per token sequence, and :func:`cached_reward_forward`
runs only the top blocks on it: scoring and training then cost about t / L of a full forward in the
lower part (for SmolLM2-135M with t = 4: 4 of 30 blocks), once a text has been seen.

Why it is exact: under causal attention with right padding (no attention mask passed, see
``models.model_attention_mask``) a real token's hidden state depends only on the tokens before it,
so a sequence's states do not depend on the batch it was computed in (up to float summation order
of the kernels, ~1e-6). The top blocks get the same rotary embeddings and causal mask the model's
own forward builds. A cache is keyed by what the states depend on: the backbone's frozen weights
(a version that changes whenever they do), the number of frozen blocks and the compute precision.

It is used only where it is exact and simple: a Llama-style backbone (``embed_tokens``, ``layers``,
``rotary_emb``, ``norm``), frozen lower blocks, one process per model (plain/DDP learners, the
scorer); full-model training (``trainable_layers`` null: the GPU presets) never touches it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from apo_ray.models.loading import reward_forward

log = logging.getLogger(__name__)

__all__ = ["FrozenPrefixCache", "cached_reward_forward", "frozen_fingerprint", "prefix_cache_for",
           "supports_prefix_cache"]

_lock = threading.Lock()
_caches: dict[tuple, FrozenPrefixCache] = {}


@dataclass
class FrozenPrefixCache:
    """Per token sequence: [T, H] hidden states after the first ``n_frozen`` blocks."""

    n_frozen: int
    max_bytes: int
    states: dict[bytes, torch.Tensor] = field(default_factory=dict)
    bytes_held: int = 0
    hits: int = 0
    misses: int = 0
    full: bool = False

    def get(self, key: bytes) -> torch.Tensor | None:
        value = self.states.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes_held + size > self.max_bytes:
            if not self.full:
                log.warning("frozen-block cache full at %.0f MiB (rm.frozen_cache_mib): later texts are computed "
                            "whole, not cached", self.bytes_held / 2**20)
                self.full = True
            return
        self.states[key] = value
        self.bytes_held += size

    def stats(self) -> dict[str, float]:
        return {"texts": len(self.states), "mib": self.bytes_held / 2**20, "hits": self.hits, "misses": self.misses}


def prefix_cache_for(model, n_frozen: int, compute: str, *, max_mib: float) -> FrozenPrefixCache:
    """The process-wide cache of ``model``'s first ``n_frozen`` blocks (by :func:`frozen_fingerprint`)
    under ``compute`` (e.g. "torch.float32/none", "torch.float32/autocast-bf16"): every scorer and
    learner of the process whose frozen blocks are the same weights shares it."""
    key = (frozen_fingerprint(model, n_frozen), n_frozen, compute)
    with _lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = FrozenPrefixCache(n_frozen, int(max_mib * 2**20))
        return cache


def frozen_fingerprint(model, n_frozen: int) -> str:
    """What the cached states depend on in ``model``'s weights: a digest of the input embedding and
    the first ``n_frozen`` blocks (per tensor: name, dtype, shape and the bytes of ~4K evenly spaced
    elements: training a block moves nearly all of its weights, so any training of the lower blocks,
    or another backbone, gives another digest and a cache of its own). Cheap: ~1M elements read."""
    import hashlib

    backbone = getattr(model, model.base_model_prefix)
    h = hashlib.sha256()
    with torch.no_grad():
        for module in (backbone.embed_tokens, *backbone.layers[:n_frozen]):
            for name, t in module.state_dict().items():
                flat = t.detach().reshape(-1)
                sample = flat[::max(1, flat.numel() // 4096)].float().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
                h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def supports_prefix_cache(model) -> bool:
    """Whether ``model``'s backbone is a Llama-style stack this module can split."""
    backbone = getattr(model, model.base_model_prefix, None)
    return all(hasattr(backbone, name) for name in ("embed_tokens", "layers", "rotary_emb", "norm"))


def _run_blocks(backbone, hidden: torch.Tensor, blocks) -> torch.Tensor:
    """``blocks`` on hidden [B, T, H] as the backbone's own forward runs them (right padding: no
    padding mask, only the causal one), positions 0..T-1."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
    mask = create_causal_mask(config=backbone.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=position_ids)
    position_embeddings = backbone.rotary_emb(hidden, position_ids=position_ids)
    for block in blocks:
        hidden = block(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                       position_ids=position_ids)
    return hidden


def _right_padded(attention_mask: torch.Tensor) -> bool:
    return bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())


def cached_reward_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          cache: FrozenPrefixCache) -> torch.Tensor:
    """``models.reward_forward`` with the first ``cache.n_frozen`` blocks read from ``cache``
    (computed, without gradients, for the sequences it lacks). input_ids, attention_mask: [B, T],
    right-padded. Returns [B] float32 rewards; gradients reach the top blocks, norm and head."""
    if not _right_padded(attention_mask):
        return reward_forward(model, input_ids, attention_mask)
    backbone = getattr(model, model.base_model_prefix)
    lengths = attention_mask.sum(dim=1).tolist()  # [B] real tokens per row
    keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
    found = [cache.get(k) for k in keys]
    missing = [i for i, s in enumerate(found) if s is None]
    if missing:
        width = max(lengths[i] for i in missing)
        with torch.no_grad():
            lower = _run_blocks(backbone, backbone.embed_tokens(input_ids[missing, :width]),
                                backbone.layers[:cache.n_frozen])  # [M, width, H]
        for j, i in enumerate(missing):
            found[i] = lower[j, :lengths[i]].detach().clone()
            cache.put(keys[i], found[i])
    width = input_ids.shape[1]
    hidden = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[0])) for s in found])  # [B, T, H]
    hidden = backbone.norm(_run_blocks(backbone, hidden, backbone.layers[cache.n_frozen:]))
    last = torch.tensor([n - 1 for n in lengths], device=hidden.device)  # [B]: the last real token
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
    head = model.score if hasattr(model, "score") else model.classifier
    return head(pooled).squeeze(-1).float()
