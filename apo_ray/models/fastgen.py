"""Fast sampling for HF causal LMs (Llama / Qwen2 / Qwen3 / Mistral families): a static KV cache and
one CUDA-graph-captured decode step.

``model.generate`` spends ~28 ms per decode step on a 0.5B model at batch 256 launching kernels and
building masks in Python; the GPU work is ~1 ms. :class:`FastSampler` removes that overhead:

- prefill: one eager forward over the left-padded prompts (in row chunks), writing keys/values into
  preallocated cache tensors ``[max_batch, kv_heads, max_len, head_dim]`` per layer;
- decode: one step (embed -> layers -> norm -> lm_head) reading only static buffers (current token,
  position, cache slot, key-validity mask), captured once per (batch, cache length) bucket in a
  ``torch.cuda.CUDAGraph`` and replayed; optionally the step is ``torch.compile``-d (fused
  elementwise kernels) before capture;
- sampling runs on the GPU after each replay with plain torch ops: ``logits / T``, top-k, top-p
  (exactly HF's ``TopKLogitsWarper`` / ``TopPLogitsWarper``), then a draw by ``argmax(p / E)``,
  ``E ~ Exp(1)``: this is how ``torch.multinomial`` draws one sample (same tokens for the same
  generator state on CPU) and needs no host sync. The host syncs only every ``check_every`` steps to
  stop once every row has emitted EOS; finished rows emit ``pad_token_id`` as in HF.

The forward pass is written here against the modules of the HF model (``embed_tokens``,
``layers[i].self_attn.{q,k,v,o}_proj``, norms, ``mlp``, ``rotary_emb``, ``lm_head``), not by calling
``model.forward`` with a transformers ``StaticCache``: the cache/mask API moved between transformers
5.17 (the GPU machine: ``cache_position`` argument) and 5.23 (here: no ``cache_position``, cache
positions tracked inside ``StaticLayer``), while these module names have been stable for years.
The weights are the model's own parameters, so ``model.load_state_dict`` (in place) is seen by the
captured graphs; if parameters are *replaced*, call :meth:`FastSampler.reset`.
Not supported (raises): sliding-window attention layers and dynamic RoPE.

On CPU (or ``use_cuda_graph=False``) the same step runs eagerly; tests compare it with ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """HF's warpers, in HF's order: temperature, top-k, top-p (min_tokens_to_keep=1). float32 in/out."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's / vLLM's repetition penalty: the logits [B, V] of tokens already in the row (``seen``,
    bool [B, V]) are divided by ``penalty`` where positive and multiplied by it where negative."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None = None, seen: torch.Tensor | None = None,
                repetition_penalty: float = 1.0) -> torch.Tensor:
    """One token per row from [B, V] logits. ``temperature <= 0``: greedy (argmax).
    ``seen`` (bool [B, V]) with ``repetition_penalty != 1``: penalise those tokens first (HF's order:
    processors, then the temperature / top-k / top-p warpers)."""
    logits = logits.float()
    if seen is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)  # = torch.multinomial(probs, 1), without its validity sync


class FastSampler:
    """Sampling decoder over an HF causal LM with a static KV cache for ``max_batch`` rows of
    ``max_len`` tokens (prompt + new). ``use_cuda_graph``: capture the decode step (CUDA only);
    ``compile``: ``torch.compile`` the decode step first (CUDA graphs still captured by us)."""

    def __init__(self, model, max_batch: int, max_len: int, use_cuda_graph: bool = True,
                 compile: bool = False, check_every: int = 16, prefill_tokens: int = 32768,
                 cache_len_multiple: int = 64):
        self.model = model
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.backbone = getattr(model, model.base_model_prefix)
        layers = self.backbone.layers
        attn = layers[0].self_attn
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.groups = self.n_heads // self.n_kv
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or getattr(cfg, "use_sliding_window", False):
            raise NotImplementedError("FastSampler supports full attention only (no sliding-window layers)")
        rope_type = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}).get(
            "rope_type", "default")
        if "dynamic" in str(rope_type):
            raise NotImplementedError("FastSampler does not support dynamic RoPE")
        self.max_batch, self.max_len = max_batch, max_len
        self.device = next(model.parameters()).device
        self.dtype = self.backbone.embed_tokens.weight.dtype
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self.compile = compile and self.device.type == "cuda"
        self.check_every = max(1, check_every)
        self.prefill_tokens = prefill_tokens
        self.cache_len_multiple = cache_len_multiple
        self.reset()

    # -- buffers ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """(Re)allocate caches and drop captured graphs."""
        dev, dt = self.device, self.dtype
        n_layers = len(self.backbone.layers)
        shape = (self.max_batch, self.n_kv, self.max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(n_layers)]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(n_layers)]
        self.tok = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # token fed to the step
        self.pos = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # its RoPE position
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # cache slot it is written to
        self.key_valid = torch.zeros(self.max_batch, self.max_len, dtype=torch.bool, device=dev)
        self.arange = torch.arange(self.max_len, device=dev)
        with torch.no_grad():
            dummy = torch.zeros(1, device=dev, dtype=dt)
            cos, sin = self.backbone.rotary_emb(dummy, self.arange[None])  # [1, max_len, head_dim]
        self.cos, self.sin = cos[0].to(dt), sin[0].to(dt)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._step_fn = torch.compile(self._decode_forward, dynamic=False) if self.compile else self._decode_forward

    # -- forward passes ---------------------------------------------------------------------------
    def _qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [b, t, hidden] -> q [b, H, t, d], k/v [b, KV, t, d] with RoPE applied."""
        attn = layer.self_attn
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(b, t, self.n_kv, self.head_dim)
        v = attn.v_proj(h).view(b, t, self.n_kv, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _mlp_block(self, layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    @torch.no_grad()
    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: slice) -> torch.Tensor:
        """Prompts [b, P] (left padded) -> last-position logits [b, V]; fills cache[rows, :, :P]."""
        b, p = input_ids.shape
        mask2d = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [b, 1, P, d]
        causal = torch.ones(p, p, dtype=torch.bool, device=self.device).tril()
        mask = (causal[None] & mask2d[:, None, :]) | torch.eye(p, dtype=torch.bool, device=self.device)[None]
        mask = mask[:, None]  # [b, 1, P, P]; pad queries see themselves only (no NaN rows)
        x = self.backbone.embed_tokens(input_ids)
        for i, layer in enumerate(self.backbone.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            self.k_cache[i][rows, :, :p] = k
            self.v_cache[i][rows, :, :p] = v
            if self.groups > 1:
                k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
            x = self._mlp_block(layer, x, o.transpose(1, 2).reshape(b, p, -1))
        x = self.backbone.norm(x[:, -1:])
        return self.model.lm_head(x)[:, 0]

    def _decode_forward(self, b: int, kv_len: int) -> torch.Tensor:
        """One token per row from the static buffers -> logits [b, V]; writes K/V at ``slot``.
        Only static tensors are read, so this can be captured in a CUDA graph."""
        tok, pos, slot = self.tok[:b], self.pos[:b], self.slot
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [b, 1, 1, d]
        mask = (self.key_valid[:b, :kv_len] & (self.arange[:kv_len] <= slot))[:, None, None]  # [b,1,1,L]
        x = self.backbone.embed_tokens(tok[:, None])
        for i, layer in enumerate(self.backbone.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(x), cos, sin)
            kc, vc = self.k_cache[i][:b, :, :kv_len], self.v_cache[i][:b, :, :kv_len]
            kc.index_copy_(2, slot, k)
            vc.index_copy_(2, slot, v)
            # GQA without copying K/V: the query heads of one KV head become its "query positions".
            q = q.reshape(b, self.n_kv, self.groups, self.head_dim)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scaling)
            x = self._mlp_block(layer, x, o.reshape(b, 1, self.n_heads * self.head_dim))
        x = self.backbone.norm(x)
        return self.model.lm_head(x)[:, 0]

    def _decode(self, b: int, kv_len: int) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self._step_fn(b, kv_len)
        key = (b, kv_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(b, kv_len)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, b: int, kv_len: int):
        # Warm-up on a side stream (lazy inits, cuBLAS handles, compilation), then capture. The
        # K/V written at `slot` during warm-up/capture is overwritten before it is ever attended.
        saved_slot = self.slot.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                self._step_fn(b, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = self._step_fn(b, kv_len)
        self.slot.copy_(saved_slot)
        return graph, out

    # -- public API -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, top_k: int | None = None,
                 min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> torch.LongTensor:
        """New tokens [B, n] for left-padded prompts ``input_ids`` [B, P] (``attention_mask`` 0 on pads).

        ``temperature <= 0`` is greedy. After a row emits an EOS id it emits ``pad_token_id``; like
        ``generate``, ``n`` stops at the step where the last row finished (else ``max_new_tokens``).
        ``generator=None`` draws from the global RNG of the device (``torch.manual_seed``).
        ``min_new_tokens``: EOS is masked out before that many tokens (HF's MinNewTokens processor).
        ``repetition_penalty``: penalise the tokens of the row so far, its prompt (attended positions)
        included; HF also penalises the pad id of left-padded rows, this does not.
        """
        b, p = input_ids.shape
        if b > self.max_batch:
            raise ValueError(f"batch {b} > max_batch {self.max_batch}")
        if p + max_new_tokens - 1 > self.max_len:
            raise ValueError(f"prompt {p} + new {max_new_tokens} tokens > max_len {self.max_len} (+1)")
        input_ids = input_ids.to(self.device)
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device))
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=self.device)
        if eos.numel() and pad_token_id is None:
            raise ValueError("pad_token_id is needed when eos_token_id is set")
        pad = 0 if pad_token_id is None else pad_token_id
        kv_len = min(self.max_len, math.ceil((p + max_new_tokens) / self.cache_len_multiple) * self.cache_len_multiple)

        if self.use_cuda_graph and (b, kv_len) not in self._graphs:
            self._graphs[(b, kv_len)] = self._capture(b, kv_len)  # before prefill: capture writes K/V
        self.key_valid[:b].fill_(True)
        self.key_valid[:b, :p] = attention_mask.bool()

        # Prefill in row chunks (bounds the [rows, P, P] masks and activations).
        rows_per_chunk = max(1, self.prefill_tokens // max(p, 1))
        logits = torch.cat([self._prefill(input_ids[lo:lo + rows_per_chunk], attention_mask[lo:lo + rows_per_chunk],
                                          slice(lo, min(b, lo + rows_per_chunk)))
                            for lo in range(0, b, rows_per_chunk)])
        self.pos[:b] = attention_mask.long().sum(-1)
        self.slot.fill_(p)

        seen = None  # bool [b, V]: tokens of each row so far, for the repetition penalty
        if repetition_penalty != 1.0:
            counts = torch.zeros(b, logits.shape[-1], dtype=torch.int32, device=self.device)
            seen = counts.scatter_add_(1, input_ids, attention_mask.int()) > 0
        out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=self.device)
        alive_before = torch.zeros(max_new_tokens, dtype=torch.bool, device=self.device)
        unfinished = torch.ones(b, dtype=torch.bool, device=self.device)
        steps = 0
        for step in range(max_new_tokens):
            if step > 0:
                logits = self._decode(b, kv_len)
                self.pos[:b] += 1
                self.slot += 1
            if step < min_new_tokens and eos.numel():
                logits = logits.float().index_fill(-1, eos, float("-inf"))
            nxt = sample_next(logits, temperature, top_k, top_p, generator, seen, repetition_penalty)
            alive_before[step] = unfinished.any()
            if eos.numel():
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
                unfinished &= ~torch.isin(nxt, eos)
            out[:, step] = nxt
            if seen is not None:
                seen[torch.arange(b, device=self.device), nxt] = True  # finished rows: pad, harmless
            self.tok[:b] = nxt
            steps = step + 1
            if eos.numel() and steps % self.check_every == 0 and not bool(unfinished.any()):
                break
        n = int(alive_before[:steps].sum()) if eos.numel() else steps
        return out[:, :n]
