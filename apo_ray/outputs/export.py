"""Hugging Face folders of the run's model versions (plain functions and one thread).

Every version a run trains (each round's policy per arm, RM_Base, each arm's RMs, the evaluation RM)
is checkpointed by the phase store (the tensors its phase trained, over its base's:
:func:`apo_ray.game.store.load_checkpoint` rebuilds the full state dict). This module writes a
version as a folder that plain ``transformers`` and vLLM load with no code of ours:

- ``model.safetensors`` + ``config.json`` (in the base checkpoint's dtype), the tokenizer with its
  chat template, ``apo_export.json`` (what the version is) and a ``README.md`` model card;
- a policy also gets ``generation_config.json`` from the run's decoding settings, which
  ``GenerationConfig.from_pretrained`` and vLLM's ``LLM.get_default_sampling_params()`` read;
- an RM is the standard ``AutoModelForSequenceClassification`` with one label: our head *is* that
  class's ``score`` layer. The one difference is where the score is read: we read it at the last
  attended token (:func:`apo_ray.models.loading.reward_forward`), transformers at the last token that is not
  ``config.pad_token_id``. Our sequences end with the end-of-turn token, which SmolLM2 also uses as
  its pad token, so the export sets a pad token that differs from it (:func:`rm_pad_token`) in both
  the config and the tokenizer; transformers then reads the same position and gives our scores.

Folders: ``<output_dir>/models/<version id>`` (``models/policy/apo/r2``, ``models/rm/base``, ...),
written to a temporary folder and renamed, so a folder that exists is complete.

A LoRA version (an adapter state dict, :mod:`apo_ray.models.lora`) is exported as a peft adapter folder
(``adapter_config.json`` naming the base model's folder, ``adapter_model.safetensors``, the tokenizer,
``apo_export.json``): ``PeftModel.from_pretrained`` on the base model loads it. With
``run.export_merged`` the folder also holds ``merged/``: base + adapter merged into the plain
folder described above.
:class:`BackgroundExporter` writes them from a thread while the game goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import SAVE_MODELS
from apo_ray.game.store import load_checkpoint
from apo_ray.models.loading import resolve_model
from apo_ray.models.lora import is_adapter, merged_state_dict, read_spec, write_peft_folder

log = logging.getLogger(__name__)

EXPORT_META = "apo_export.json"


def version_kind(version_id: str) -> str:
    """``policy`` or ``rm`` from a version id (``policy/apo/r1``, ``rm/base``)."""
    kind = version_id.split("/", 1)[0]
    if kind not in ("policy", "rm"):
        raise ValueError(f"{version_id!r} is not a policy or RM version id")
    return kind


def export_folder(models_dir: Path, version_id: str) -> Path:
    return Path(models_dir) / Path(*version_id.split("/"))


def rm_pad_token(tokenizer) -> tuple[str, int]:
    """A pad token for the exported RM that never ends a scored sequence (those end with eos):
    the tokenizer's own pad token when it differs from eos, else its unk or bos token."""
    eos = tokenizer.eos_token_id
    for token, token_id in ((tokenizer.pad_token, tokenizer.pad_token_id), (tokenizer.unk_token, tokenizer.unk_token_id),
                            (tokenizer.bos_token, tokenizer.bos_token_id)):
        if token is not None and token_id is not None and token_id != eos:
            return token, token_id
    raise ValueError(f"{tokenizer.name_or_path}: no special token other than eos to pad with; the exported RM "
                     f"would read its score before the final end-of-turn token")


def generation_config_values(decoding: Any, stop: Iterable[str] = ()) -> dict[str, Any]:
    """``GenerationConfig`` fields from our decoding settings (any object with ``max_new_tokens``,
    ``temperature``, ``top_p`` and optionally ``top_k``, ``repetition_penalty``).

    Sampling: ``top_k=0`` is written out: transformers would otherwise apply its default top-k of
    50, which our generators never do; vLLM reads 0 as "off" too. Greedy (temperature 0): the
    sampling fields are cleared (None), also any the base model's own generation config set, since
    transformers refuses to save a greedy config that carries them."""
    temperature = float(getattr(decoding, "temperature", 1.0))
    values: dict[str, Any] = {"max_new_tokens": int(decoding.max_new_tokens), "do_sample": temperature > 0}
    if temperature > 0:
        values |= {"temperature": temperature, "top_p": float(getattr(decoding, "top_p", 1.0)),
                   "top_k": int(getattr(decoding, "top_k", 0) or 0)}
    else:
        values |= {"temperature": None, "top_p": None, "top_k": None}
    penalty = float(getattr(decoding, "repetition_penalty", 1.0))
    if penalty != 1.0:
        values["repetition_penalty"] = penalty
    if list(stop):
        values["stop_strings"] = list(stop)
    return values


def _build_on_meta(auto_cls, config, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype):
    """``auto_cls`` from ``config`` with ``state_dict`` as its weights, allocating nothing twice."""
    with torch.device("meta"):
        model = auto_cls.from_config(config)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"state dict does not fit {type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    return model.to(dtype).eval()


def export_version(version_id: str, state_dict: Mapping[str, torch.Tensor], out_dir: Path, *, base_model: str,
                   generation: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None,
                   overwrite: bool = False, merged: bool = False) -> Path:
    """Write ``state_dict`` (weights of ``base_model``'s architecture) as a HF folder ``out_dir``;
    a policy's ``generation_config.json`` gets ``generation`` (see :func:`generation_config_values`).
    Returns ``out_dir``; an existing complete folder is kept unless ``overwrite``."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GenerationConfig,
    )

    out_dir = Path(out_dir)
    if (out_dir / EXPORT_META).exists() and not overwrite:
        return out_dir
    if is_adapter(state_dict):
        return _export_adapter(version_id, state_dict, out_dir, base_model=base_model, generation=generation,
                               meta=meta, overwrite=overwrite, merged=merged)
    kind = version_kind(version_id)
    source = resolve_model(base_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    info = {"version": version_id, "kind": kind, "base_model": base_model, "dtype": str(dtype).removeprefix("torch."),
            **(meta or {})}
    if kind == "policy":
        model = _build_on_meta(AutoModelForCausalLM, config, state_dict, dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        try:
            gen_config = GenerationConfig.from_pretrained(source)
        except OSError:
            gen_config = GenerationConfig.from_model_config(config)
        gen_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          **dict(generation or {}))
        model.generation_config = gen_config
        info["generation"] = gen_config.to_diff_dict()
    else:
        pad_token, pad_id = rm_pad_token(tokenizer)
        tokenizer.pad_token = pad_token
        tokenizer.padding_side = "right"
        config.num_labels = 1
        config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
        config.pad_token_id = pad_id  # where transformers reads the score: see the module docstring
        model = _build_on_meta(AutoModelForSequenceClassification, config, state_dict, dtype)
        info["score_position"] = (f"the last token that is not the pad token {pad_token!r} (id {pad_id}): "
                                  f"the end-of-turn token {tokenizer.eos_token!r} that ends every scored text")
    with _folder_written_whole(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(info, tokenizer))
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out_dir


@contextlib.contextmanager
def _folder_written_whole(out_dir: Path, overwrite: bool):
    """A temporary folder beside ``out_dir``, renamed to it when the block ends without an error, so
    a reader never sees half an export (removed on an error)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A unique name made with mkdir, not mkdtemp: mkdtemp's folder is mode 0700 whatever the umask,
    # and the renamed export would be unreadable to the other users of a shared cluster.
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_adapter(version_id: str, adapter: Mapping[str, torch.Tensor], out_dir: Path, *, base_model: str,
                    generation: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, overwrite: bool,
                    merged: bool) -> Path:
    """A LoRA version: its peft adapter folder (+ ``merged/``, the full model, with ``merged``)."""
    from transformers import AutoTokenizer

    spec = read_spec(adapter)
    source = resolve_model(base_model)
    info = {"version": version_id, "kind": version_kind(version_id), "base_model": base_model,
            "base_model_path": source, "format": "peft LoRA adapter", "lora_rank": spec.rank,
            "lora_alpha": spec.alpha, "target_modules": list(spec.target_modules),
            "modules_to_save": list(spec.modules_to_save), "merged": "merged/" if merged else None, **(meta or {})}
    with _folder_written_whole(out_dir, overwrite) as tmp:
        write_peft_folder(adapter, tmp, base_path=source)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        if merged:
            export_version(version_id, merged_state_dict(adapter), tmp / "merged", base_model=base_model,
                           generation=generation, meta=meta)
        (tmp / EXPORT_META).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return out_dir


def model_card(info: Mapping[str, Any], tokenizer) -> str:
    """The folder's README: what the version is and how to load it."""
    where = f"arms {', '.join(info['arms'])}, round {info['round']}" if info.get("arms") else "see apo_export.json"
    what = "policy" if info["kind"] == "policy" else "reward model"
    head = (f"# `{info['version']}` (apo_ray)\n\nA {what} trained by apo_ray's RM-LLM game (Adversarial "
            f"Preference Optimization) from `{info['base_model']}`; used by {where}.\n\n")
    if info["kind"] == "policy":
        return head + (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(path)\ntokenizer = AutoTokenizer.from_pretrained(path)\n```\n\n"
            "vLLM: `vllm.LLM(model=path)`; `generation_config.json` holds the run's decoding settings, which "
            "vLLM takes as its default sampling parameters.\n")
    return head + (
        "```python\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "rm = AutoModelForSequenceClassification.from_pretrained(path)  # num_labels=1\n"
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        "text = tokenizer.apply_chat_template(dialogue, tokenize=False, add_generation_prompt=True)\n"
        f"text += response + {tokenizer.eos_token!r}\n"
        "score = rm(**tokenizer(text, add_special_tokens=False, return_tensors='pt')).logits[0, 0]\n```\n\n"
        f"The score is read at {info['score_position']}. Batches may be padded on either side.\n")


def select_versions(records: Iterable[Mapping[str, Any]], save_models: str, last_round: int) -> list[tuple[str, dict]]:
    """(version id, meta) of the versions ``save_models`` keeps, from summary records."""
    uses: dict[str, dict] = {}
    for r in records:
        if save_models == "last" and r["round"] != last_round:
            continue
        for field in ("policy", "rm", "eval_rm"):
            version = r.get(field)
            if not version or version in ("policy/init", "rm/pretrained"):
                continue  # the starting checkpoints: the base models themselves
            use = uses.setdefault(version, {"arms": [], "round": r["round"], "role": field})
            if field != "eval_rm" and r["rm_mode"] not in use["arms"]:
                use["arms"].append(r["rm_mode"])
    return list(uses.items()) if save_models != "none" else []


class BackgroundExporter:
    """Writes HF folders in the background, fed by the game's records as rounds finish.

    ``submit_record(record)``: queues the versions that ``save_models`` keeps from that record; a
    thread exports them one at a time, each in a child process (``python -m apo_ray.outputs.export``) that
    reads the phase store's checkpoint (complete once its phase has finished). A child process, not the
    thread itself: transformers sets torch's process-wide default dtype while it builds a model, so
    a model built in a thread can change the dtype of tensors the game creates at that moment.
    ``close()`` waits for the queue and raises if any export failed (the run's other results are
    on disk by then)."""

    def __init__(self, models_dir: Path, version_path, *, policy_model: str, reward_model: str,
                 save_models: str, last_round: int, generation: Mapping[str, Any] | None = None,
                 merged: bool = False):
        if save_models not in SAVE_MODELS:
            raise ValueError(f"run.save_models must be one of {SAVE_MODELS}, got {save_models!r}")
        self.models_dir, self.version_path = Path(models_dir), version_path
        self.base = {"policy": policy_model, "rm": reward_model}
        self.save_models, self.last_round = save_models, last_round
        self.generation = dict(generation or {})
        self.merged = merged  # LoRA versions: also write the merged model
        self.done: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self._meta: dict[str, dict] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="apo-exporter", daemon=True)
        self._thread.start()

    def submit_record(self, record: Mapping[str, Any]) -> None:
        for version, meta in select_versions([record], self.save_models, self.last_round):
            known = self._meta.get(version)
            if known is not None:  # another arm uses the same version: one folder
                known["arms"] = sorted(set(known["arms"]) | set(meta["arms"]))
                continue
            self._meta[version] = meta
            self._queue.put(version)

    def _work(self) -> None:
        child = None
        try:
            while True:
                version = self._queue.get()
                if version is None:
                    return
                folder = export_folder(self.models_dir, version)
                job = {"version": version, "weights": str(self.version_path(version)), "out": str(folder),
                       "base_model": self.base[version_kind(version)], "generation": self.generation,
                       "meta": self._meta[version], "merged": self.merged}
                if child is None or child.poll() is not None:
                    child = self._start_child()
                child.stdin.write(json.dumps(job) + "\n")
                child.stdin.flush()
                reply = child.stdout.readline()
                outcome = json.loads(reply) if reply else {"error": f"the export process died (exit {child.wait()})"}
                if "error" in outcome:
                    self.errors[version] = outcome["error"].strip().splitlines()[-1]
                    log.error("export of %s failed:\n%s", version, outcome["error"])
                else:
                    self.done[version] = str(folder)
                    log.info("exported %s -> %s", version, folder)
        finally:
            if child is not None and child.poll() is None:
                child.stdin.close()
                child.wait()

    def _start_child(self) -> subprocess.Popen:
        """``python -m apo_ray.outputs.export``: imports torch and transformers once, then exports the jobs it
        reads from stdin (one JSON line each, one JSON line back); its log goes to models/export.log."""
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, OMP_NUM_THREADS="1",  # one core: the game keeps the rest
                   PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.models_dir / "export.log", "a") as log_file:
            return subprocess.Popen([sys.executable, "-m", "apo_ray.outputs.export"], env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)

    def close(self) -> dict[str, str]:
        """Wait for every queued export; write ``models/index.json``; raise if any failed."""
        self._queue.put(None)
        self._thread.join()
        if self._meta:
            write_index(self.models_dir, {v: self._meta[v] | {"folder": f} for v, f in self.done.items()},
                        self.errors)
        if self.errors:
            raise RuntimeError(f"model export failed for {', '.join(sorted(self.errors))} "
                               f"(run `python jobs/export.py` to retry): {self.errors}")
        return dict(self.done)


def write_index(models_dir: Path, versions: Mapping[str, Mapping[str, Any]], errors: Mapping[str, str] = ()) -> Path:
    """``models/index.json``: every exported version with its folder, arms and round (merged with
    what an earlier export wrote there)."""
    path = Path(models_dir) / "index.json"
    index = json.loads(path.read_text()) if path.exists() else {"versions": {}}
    index["versions"].update({v: dict(m) for v, m in versions.items()})
    index["errors"] = dict(errors)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path


def _serve_exports() -> None:
    """``python -m apo_ray.outputs.export``: one JSON job per stdin line -> one JSON reply per stdout line
    (see :class:`BackgroundExporter`)."""
    import traceback

    torch.set_num_threads(1)
    reply_to = sys.stdout
    sys.stdout = sys.stderr  # library prints must not mix with the replies
    for line in sys.stdin:
        job = json.loads(line)
        try:
            state = load_checkpoint(job["weights"])  # a local path or a URI (apo_ray.storage)
            export_version(job["version"], state, Path(job["out"]), base_model=job["base_model"],
                           generation=job["generation"], meta=job["meta"], merged=job.get("merged", False))
            reply = {"folder": job["out"]}
        except Exception:  # noqa: BLE001 - any failure is the reply
            reply = {"error": traceback.format_exc()}
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()


if __name__ == "__main__":
    _serve_exports()
