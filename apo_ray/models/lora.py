"""LoRA learners and adapter-only weight exchange (peft), kept apart from the rest of the code.

With ``rm.lora.rank`` / ``policy.lora.rank`` > 0 a learner trains low-rank adapters on the frozen
base model (plus, for the RM, its scalar head in full), and a version of that model is *its adapter
only*: an **adapter state dict**, peft's own names and tensors (what ``adapter_model.safetensors``
of a peft folder holds, e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` and
the RM's ``base_model.model.score.weight``) plus one entry :data:`META_KEY`, a uint8 tensor of JSON
that names the base model and the adapter's shape (rank, alpha, targets, blocks).

Because it is a plain state dict, everything that moves weights already moves it unchanged (the
object-store packing, the phase checkpoint ``.pt``, the in-process handles), only megabytes instead
of the whole model, and it describes itself wherever it lands: a receiver (generator, scorer, vLLM,
exporter) needs nothing but the tensors to apply it.

Receivers inject the adapter once into the model they hold (:class:`AdapterHost`) and copy each new
version's tensors into it; the base model (the ``None`` weights) is the same model with the adapter
layers switched off, so returning to it costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apo_ray.models.loading import decoder_layers, load_policy, load_reward_model

META_KEY = "apo_lora.meta"
FORMAT = 1


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is: enough to rebuild peft's ``LoraConfig`` on any base model of its kind."""

    base_model: str  # the model name the run configured (an alias or a hub id / folder)
    role: str  # "rm" (adapters + the scalar head in full) or "policy"
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...] | None  # the decoder blocks that carry adapters; None: all
    modules_to_save: tuple[str, ...] = ()  # trained in full beside the adapter (the RM's head)

    def peft_config(self, *, inference: bool = False):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), modules_to_save=list(self.modules_to_save) or None,
                          layers_to_transform=list(self.layers) if self.layers is not None else None,
                          inference_mode=inference)

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, d: Mapping) -> AdapterSpec:
        if d.get("format") != FORMAT:
            raise ValueError(f"adapter metadata of format {d.get('format')!r}; this code reads format {FORMAT}")
        layers = d["layers"]
        return cls(d["base_model"], d["role"], int(d["rank"]), float(d["alpha"]), float(d["dropout"]),
                   tuple(d["target_modules"]), None if layers is None else tuple(layers), tuple(d["modules_to_save"]))


def head_name(model: nn.Module) -> str:
    """The attribute of a sequence-classification model's scalar head (``score`` for Llama/Qwen)."""
    return "score" if hasattr(model, "score") else "classifier"


def spec_for(model: nn.Module, base_model: str, role: str, lora, trainable_layers: int | None) -> AdapterSpec:
    """The adapter a learner trains on ``model`` from its config section ``lora`` (a
    :class:`apo_ray.config.LoraConfig` or any object with its fields). ``trainable_layers`` N puts
    the adapters on the top N blocks only (backward then stops there, as without LoRA)."""
    n = len(decoder_layers(model))
    layers = None
    if trainable_layers is not None:
        if not 0 < trainable_layers <= n:
            raise ValueError(f"{role}.trainable_layers={trainable_layers} with {role}.lora.rank={lora.rank}: "
                             f"adapters go on the top N blocks, N in [1, {n}]")
        layers = tuple(range(n - trainable_layers, n))
    return AdapterSpec(base_model, role, int(lora.rank), float(lora.alpha), float(lora.dropout),
                       tuple(lora.target_modules), layers, (head_name(model),) if role == "rm" else ())


def apply_lora(model: nn.Module, spec: AdapterSpec, *, inference: bool = False):
    """Inject ``spec``'s adapters into ``model`` in place; returns peft's ``PeftModel`` around it
    (``model`` itself keeps working: its targeted linears now hold the adapters). Only the adapters
    and ``modules_to_save`` (a copy of the RM's head) require grad afterwards."""
    from peft import get_peft_model

    return get_peft_model(model, spec.peft_config(inference=inference))


def meta_tensor(spec: AdapterSpec) -> torch.Tensor:
    return torch.tensor(list(json.dumps(spec.to_json()).encode("utf-8")), dtype=torch.uint8)


def is_adapter(state: Mapping[str, Any] | None) -> bool:
    """Whether a state dict (or anything keyed by tensor names) is an adapter state dict."""
    return state is not None and META_KEY in state


def read_spec(state: Mapping[str, torch.Tensor]) -> AdapterSpec:
    raw = state[META_KEY]
    return AdapterSpec.from_json(json.loads(bytes(raw.cpu().numpy().tobytes()).decode("utf-8")))


def adapter_parameters(peft_model) -> dict[str, torch.Tensor]:
    """The trained tensors under their exchange names (peft's saved names): the adapter's
    parameters and the RM head's copy, as the live parameters (not copies)."""
    from peft.utils import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(peft_model, state_dict=peft_model.state_dict(keep_vars=True)))


def adapter_state(peft_model, spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """An adapter state dict (CPU copies) of ``peft_model``: its tensors plus the metadata entry."""
    out = {k: v.detach().to("cpu", copy=True) for k, v in adapter_parameters(peft_model).items()}
    out[META_KEY] = meta_tensor(spec)
    return out


def tensors_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors without the metadata entry."""
    return {k: v for k, v in state.items() if k != META_KEY}


def load_adapter(peft_model, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into ``peft_model``'s adapter (in place, dtype cast as needed);
    every tensor must find its place."""
    expected = set(adapter_parameters(peft_model))
    got = set(tensors_of(state))
    if expected != got:
        raise KeyError(f"adapter does not fit the model: missing {sorted(expected - got)[:4]}, "
                       f"unexpected {sorted(got - expected)[:4]}")
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, tensors_of(state))
    if result.unexpected_keys:
        raise KeyError(f"adapter tensors peft did not place: {result.unexpected_keys[:4]}")


def check_spec(state: Mapping[str, torch.Tensor], spec: AdapterSpec, where: str) -> None:
    """Refuse an adapter of another shape or base model than ``spec`` (e.g. a checkpoint of an
    earlier run resumed under other lora settings)."""
    got = read_spec(state)
    if got != spec:
        raise ValueError(f"{where}: the adapter given ({got}) is not the one configured ({spec})")


class AdapterHost:
    """Serves adapters on a model held by a generator or scorer: the adapter is injected at the first
    adapter version (with that version's spec), later versions copy their tensors in place, and
    :meth:`use_base` switches the adapter layers off (the pretrained model again, for free)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.peft = None
        self.spec: AdapterSpec | None = None
        self.active = False

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        spec = read_spec(state)
        if self.peft is None:
            self.peft = apply_lora(self.model, spec, inference=True)
            self.spec = spec
        elif spec != self.spec:
            raise ValueError(f"this model serves adapters of {self.spec}; got one of {spec}")
        load_adapter(self.peft, state)
        self.peft.base_model.enable_adapter_layers()
        self.active = True

    def use_base(self) -> None:
        if self.peft is not None:
            self.peft.base_model.disable_adapter_layers()
        self.active = False

    def check_full_state(self) -> None:
        if self.peft is not None:
            raise ValueError("a full state dict for a model that serves LoRA adapters: a run trains either "
                             "adapters (lora.rank > 0) or the weights, not both")


# --- peft folders and merged models (export, vLLM) ---------------------------------------------------------------


def write_peft_folder(state: Mapping[str, torch.Tensor], out_dir: Path, *, base_path: str | None = None) -> Path:
    """Write an adapter state dict as a peft adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` and vLLM's ``LoRARequest``
    load. ``base_path``: what to record as the base model (default: the spec's model name)."""
    from safetensors.torch import save_file

    spec = read_spec(state)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = spec.peft_config(inference=True)
    config.base_model_name_or_path = base_path or spec.base_model
    config.save_pretrained(str(out_dir))
    save_file({k: v.detach().contiguous() for k, v in tensors_of(state).items()},
              str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def merged_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full weights of base model + adapter (peft's ``merge_and_unload``), HF names: what a
    plain transformers model of the base architecture loads."""
    spec = read_spec(state)
    load = load_reward_model if spec.role == "rm" else load_policy
    torch.manual_seed(0)  # the RM's head is replaced by the adapter's copy; the seed only spares randomness
    model = load(spec.base_model, dtype="float32")
    peft_model = apply_lora(model, spec, inference=True)
    load_adapter(peft_model, state)
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
