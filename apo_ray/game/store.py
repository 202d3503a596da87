"""The run's checkpoint: finished phases on disk, and the fingerprint a resumed run must match.

Each phase of :class:`apo_ray.game.loop.APOGame` is stored under a key naming what it was computed from
(``samples/policy/apo/r1/gold``). On disk, in ``<run.output_dir>/phases/``:

- ``<key>.json``: ``{"format": 1, "sha256": <of the value's JSON>, "value": ...}``, plus for a
  weights phase ``"weights": {"file": name, "bytes": n, "sha256": h}`` describing its checkpoint
  ``<key>.safetensors``. The ``.json`` is written last, so it marks the phase finished; a key is
  never half-written (file written and fsynced under a temporary name, renamed, then the folder
  fsynced).
- ``<key>.safetensors``: only the tensors the phase trained (the learners' ``requires_grad``
  parameters: with ``*.trainable_layers: 4`` the top 4 blocks and the head, 14M of SmolLM2-135M's 135M),
  and in its metadata the version it was trained from (``base``: another key of this folder, or
  ``rm/pretrained`` / ``policy/init``, the base model itself) and the name, dtype and shape of every
  tensor of the full state dict. :func:`load_checkpoint` rebuilds the full state dict from the
  chain of bases, bit for bit (a frozen tensor is the base's, cast to the dtype the learner held it
  in). Run folders written before (full ``<key>.pt`` state dicts) still resume and export.
- ``fingerprint.json``: :func:`run_fingerprint` of the run that wrote the phases.

A phase file that does not check out (truncated, bit-flipped, its checkpoint shorter or different
from what the marker says) is moved aside to ``<name>.corrupt`` with a warning naming it, and the
phase is computed again: phases are deterministic functions of their inputs, so the result is the same.

:func:`open_store` refuses to mix runs: existing phases need ``run.resume=true``, an intact
fingerprint and the same settings (:func:`check_store` does the checks without writing anything).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from apo_ray import storage
from apo_ray.config import Config, to_dict
from apo_ray.data import EMBEDDED_SCHEME, HF_SCHEME, JSONL_SUFFIXES
from apo_ray.game.digests import file_digest, file_sha256
from apo_ray.game.stack import software_stack, stack_changes
from apo_ray.game.system import GameSystem, Weights
from apo_ray.models.loading import load_policy, load_reward_model

log = logging.getLogger(__name__)

FORMAT = 1
FINGERPRINT = "fingerprint.json"
# The run's test pairs' data sources (one label per pair, in order), written by the game at setup.
TEST_SOURCES_KEY = "data/test_sources"


class ResumeError(RuntimeError):
    """The output folder cannot be (re)used as asked; the message names the folder or file."""


# --------------------------------------------------------------------------------------------------
# Durable files
# --------------------------------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX: the entry lives in the folder).
    Nothing to do on an object store (a written object is durable once the write returns)."""
    if storage.is_uri(folder):
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash it holds either its old content or all of ``data``:
    a temporary file, fsynced, renamed over ``path``, then the folder fsynced. On an object store
    one write: an object appears whole or not at all."""
    if storage.is_uri(path):
        storage.write_bytes(path, data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _value_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Checkpoints that store what changed
# --------------------------------------------------------------------------------------------------

CHECKPOINT_SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"  # full state dicts, written before checkpoints stored only what changed
CHECKPOINT_FORMAT = "apo_ray.trained/1"
# The version ids of the base models: a version trained from one of these names no file as its
# base; its frozen tensors are the base model's own (its role says which loader builds it).
PRETRAINED_BASES = {"rm/pretrained": "rm", "policy/init": "policy"}


def checkpoint_name(key: str, suffix: str = CHECKPOINT_SUFFIX) -> str:
    return key.replace("/", "__") + suffix


def write_checkpoint(path: Path, state_dict: Mapping[str, torch.Tensor], *, base: str | None = None,
                     base_model: str | None = None, trained: Iterable[str] | None = None) -> None:
    """Write the tensors of ``state_dict`` named in ``trained`` (all of them when ``trained`` or
    ``base`` is None) to the safetensors file ``path`` (under a temporary name, then renamed), with
    ``base`` (the version id the others are taken from), ``base_model`` and the full state dict's
    layout (name, dtype, shape of every tensor, in order) in its metadata.

    Frozen tensors are the base's: a learner loads its initial weights into a model of one dtype
    and never changes a parameter without ``requires_grad``, so :func:`load_checkpoint` gets them
    back exactly by casting the base's to the recorded dtype."""
    from safetensors.torch import save, save_file

    if base is None or trained is None:
        keep = list(state_dict)
    else:
        wanted = set(trained)
        keep = [name for name in state_dict if name in wanted]
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage (views over one
    # packed buffer, tied weights); only the kept tensors are copied.
    tensors = {name: state_dict[name].detach().to("cpu").contiguous().clone() for name in keep}
    layout = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in state_dict.items()]
    metadata = {"format": CHECKPOINT_FORMAT, "base": base or "", "base_model": base_model or "",
                "layout": json.dumps(layout)}
    if storage.is_uri(path):  # an object appears whole: one upload of the serialized file
        storage.write_bytes(path, save(tensors, metadata=metadata))
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600 whatever the umask
    os.replace(tmp, path)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: racy with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _suffix(path) -> str:
    name = storage.name(path)
    return name[name.rfind("."):] if "." in name else ""


def _marker_of(path) -> Any:
    name = storage.name(path)
    return storage.join(storage.parent(path), name.removesuffix(_suffix(path)) + ".json")


def _check_against_marker(path: Path) -> None:
    """A base file must be the one its phase recorded (a changed base would change every version
    built on it without a word)."""
    marker_path = _marker_of(path)
    if not storage.exists(marker_path):
        return
    recorded = (json.loads(storage.read_text(marker_path)).get("weights") or {})
    size, sha256 = file_sha256(path)
    if size != recorded.get("bytes") or sha256 != recorded.get("sha256"):
        raise ValueError(f"{path} is not the file {storage.name(marker_path)} recorded ({size} bytes, recorded "
                         f"{recorded.get('bytes')}): the versions trained from it cannot be rebuilt")


def pretrained_state_dict(role: str, model: str) -> dict[str, torch.Tensor]:
    """The base model's state dict as a learner loads it (fp32; cast to the recorded dtypes by the
    caller). The RM's scalar head starts random (seed fixed here, the global RNG left as it was);
    it is always trained, so a checkpoint stores it and this value is never used."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loaded = (load_reward_model if role == "rm" else load_policy)(model, dtype="float32")
    return dict(loaded.state_dict())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The full CPU state dict of the version checkpointed at ``path`` (see the module docstring):
    its trained tensors over its base's (a chain of files in the same folder ending at a base
    model, each checked against its phase's recorded checksum). A legacy ``.pt`` is read whole.
    Errors name the file."""
    from safetensors import safe_open

    path = path if storage.is_uri(path) else Path(path)
    chain: list[tuple[Path, dict[str, torch.Tensor], list]] = []  # the version first, then its bases
    start: dict[str, torch.Tensor] | None = None
    while True:
        if _suffix(path) == LEGACY_SUFFIX:
            with storage.open_file(path, "rb") as fh:
                start = torch.load(fh, map_location="cpu", weights_only=True)
            break
        try:
            with storage.local_copy(path) as local, safe_open(str(local), framework="pt", device="cpu") as fh:
                metadata = fh.metadata() or {}
                names = fh.keys()
                tensors = {name: fh.get_tensor(name) for name in names}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not an apo_ray checkpoint (metadata format {metadata.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        layout = json.loads(metadata["layout"])
        chain.append((path, tensors, layout))
        base = metadata.get("base") or None
        if len(tensors) == len(layout) or base is None:
            break  # complete in itself
        if base in PRETRAINED_BASES:
            if not metadata.get("base_model"):
                raise ValueError(f"{path}: trained from {base} but names no base_model")
            start = pretrained_state_dict(PRETRAINED_BASES[base], metadata["base_model"])
            break
        base_path = storage.join(storage.parent(path), checkpoint_name(base))
        legacy = storage.join(storage.parent(path), checkpoint_name(base, LEGACY_SUFFIX))
        if not storage.exists(base_path) and storage.exists(legacy):
            base_path = legacy
        if not storage.exists(base_path):
            raise FileNotFoundError(f"{path}: its base version {base} ({storage.name(base_path)}) is missing from "
                                    f"{storage.parent(path)}")
        _check_against_marker(base_path)
        if any(str(p) == str(base_path) for p, _, _ in chain):
            raise ValueError(f"{path}: its chain of base versions loops at {storage.name(base_path)}")
        path = base_path
    state = start
    for file, tensors, layout in reversed(chain):  # the oldest base first
        rebuilt: dict[str, torch.Tensor] = {}
        for name, dtype, shape in layout:
            if name in tensors:
                tensor = tensors[name]
            elif state is not None and name in state:
                tensor = state[name].to(getattr(torch, dtype))
            else:
                raise ValueError(f"{file}: tensor {name} is neither stored nor in its base")
            if list(tensor.shape) != shape:
                raise ValueError(f"{file}: tensor {name} has shape {list(tensor.shape)} in its base, "
                                 f"{shape} recorded")
            rebuilt[name] = tensor
        state = rebuilt
    return state


# --------------------------------------------------------------------------------------------------
# The phase store
# --------------------------------------------------------------------------------------------------


class PhaseStore:
    """Results of finished phases on disk: ``<dir>/<key>.json`` plus ``<key>.safetensors`` for
    weights (see the module docstring for the format, the durability and what happens to a corrupt
    phase)."""

    def __init__(self, root: Path | str, system: GameSystem | None):
        self.root = root if storage.is_uri(root) else Path(root)  # a folder or a URI (apo_ray.storage)
        self.system = system
        storage.makedirs(self.root)

    def _path(self, key: str, suffix: str) -> Path:
        return storage.join(self.root, key.replace("/", "__") + suffix)

    def _quarantine(self, key: str, why: str) -> None:
        """Move the phase's files aside (kept for a post-mortem) so it is computed again."""
        for suffix in (".json", CHECKPOINT_SUFFIX, LEGACY_SUFFIX):
            path = self._path(key, suffix)
            if storage.exists(path):
                storage.rename(path, f"{path}.corrupt")
        log.warning("%s: %s; moved aside to %s.corrupt, the phase will be computed again",
                    self._path(key, ".json"), why, storage.name(self._path(key, ".json")))

    def _marker(self, key: str) -> dict | None:
        """The checked marker of a finished phase; None when it is not finished or does not check out."""
        path = self._path(key, ".json")
        if not storage.exists(path):
            return None
        try:
            marker = json.loads(storage.read_bytes(path).decode("utf-8"))
            if not isinstance(marker, dict) or marker.get("format") != FORMAT or "value" not in marker:
                raise ValueError(f"not a phase file of format {FORMAT}")
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            self._quarantine(key, f"unreadable phase file ({type(exc).__name__}: {exc})")
            return None
        if marker.get("sha256") != _value_sha256(marker["value"]):
            self._quarantine(key, "its content does not match its checksum")
            return None
        return marker

    def get(self, key: str) -> Any | None:
        marker = self._marker(key)
        return None if marker is None else marker["value"]

    def put(self, key: str, value: Any, weights: dict | None = None) -> None:
        marker = {"format": FORMAT, "sha256": _value_sha256(value), "value": value}
        if weights is not None:
            marker["weights"] = weights
        write_durably(self._path(key, ".json"), json.dumps(marker).encode("utf-8"))

    def get_version(self, key: str) -> Weights | None:
        marker = self._marker(key)
        if marker is None:
            return None
        expected = marker.get("weights") or {}
        pt = storage.join(self.root, expected.get("file", checkpoint_name(key, LEGACY_SUFFIX)))  # no "file": a legacy .pt
        if not storage.exists(pt):
            self._quarantine(key, f"its weights file {storage.name(pt)} is missing")
            return None
        if storage.size(pt) != expected.get("bytes") or file_sha256(pt)[1] != expected.get("sha256"):
            self._quarantine(key, f"its weights file {storage.name(pt)} is not the one it recorded "
                                  f"({storage.size(pt)} bytes, recorded {expected.get('bytes')})")
            return None
        try:
            handle = self.system.load_weights(pt)
        except Exception as exc:  # noqa: BLE001 - a file that passed the checksum but does not load
            self._quarantine(key, f"{storage.name(pt)} does not load ({type(exc).__name__}: {exc})")
            return None
        return Weights(key, handle, str(pt))

    def put_version(self, key: str, handle: Any, stats: dict, *, base: str | None = None,
                    base_model: str | None = None, trained: Iterable[str] | None = None) -> Weights:
        """Checkpoint the version ``key`` (``handle``: the system's), trained from the version
        ``base`` (of ``base_model``): only the tensors named in ``trained`` are written (all
        when either is None)."""
        pt = self._path(key, CHECKPOINT_SUFFIX)
        self.system.save_weights(handle, pt, base=base, base_model=base_model, trained=trained)
        size, sha256 = file_sha256(pt, sync=True)  # the weights are on disk before the marker says so
        fsync_dir(self.root)
        self.put(key, stats, weights={"file": storage.name(pt), "bytes": size, "sha256": sha256,
                                      "base": base})  # the .json marks them complete
        return Weights(key, handle, str(pt))

    def adopt_weights(self, key: str, source: PhaseStore, source_key: str) -> None:
        """Record ``source``'s finished weights phase ``source_key`` as this store's ``key`` (a
        shared evaluation RM in a run's own store, so the run's folder is complete): a hard link
        where the filesystem allows, else a copy; the checksums come along."""
        marker = source._marker(source_key)
        if marker is None or "weights" not in marker:
            raise FileNotFoundError(f"{source.root}: no finished weights phase {source_key!r} to adopt")
        src = source.version_path(source_key)
        dst = self._path(key, _suffix(src))  # the source's format (.safetensors, or a legacy .pt)
        if storage.is_uri(src) or storage.is_uri(dst):
            storage.write_bytes(dst, storage.read_bytes(src))
        else:
            Path(dst).unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        fsync_dir(self.root)
        self.put(key, marker["value"], weights=dict(marker["weights"]) | {"file": storage.name(dst)})

    def version_stats(self, key: str) -> dict:
        return self.get(key) or {}

    def has(self, key: str) -> bool:
        """Whether ``key`` has a marker (checked for integrity when it is read)."""
        return storage.exists(self._path(key, ".json"))

    def version_path(self, key: str) -> Path:
        """The checkpoint of a finished weights phase (:func:`load_checkpoint` reads it whole)."""
        path = self._path(key, CHECKPOINT_SUFFIX)
        legacy = self._path(key, LEGACY_SUFFIX)
        return legacy if storage.exists(legacy) and not storage.exists(path) else path

    def weights_keys(self) -> list[str]:
        """Keys of every finished weights phase (a checkpoint with its ``.json`` marker)."""
        names = set(storage.listdir(self.root))
        return sorted({n.removesuffix(suffix).replace("__", "/") for n in names
                       for suffix in (CHECKPOINT_SUFFIX, LEGACY_SUFFIX)
                       if n.endswith(suffix) and n.removesuffix(suffix) + ".json" in names})


# --------------------------------------------------------------------------------------------------
# The resume fingerprint
# --------------------------------------------------------------------------------------------------

def _source_digest(value: str) -> str | None:
    """The digest of one local data source: a file's bytes, or a folder's JSONL names and contents."""
    path = Path(value)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        listing = "".join(f"{p.relative_to(path)}\0{file_digest(p)}\n" for p in files)
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()
    return file_digest(path) if path.is_file() else None


def data_file_digests(cfg: Config) -> dict[str, str | None]:
    """``{"data.path": sha256, "data.golden_path": ..., "eval.rm_all_paths[0]": ...}`` for every data
    setting (``data.path`` and any ``data.*_path``, a single source or a list, and the evaluation
    RM's extra sets) that names local files; a folder's digest covers the names and contents of the
    JSONL files in it. ``hf://`` datasets are identified by their spec only (already in the config),
    as is the data set shipped in the package (``embedded:``)."""
    settings = {f"data.{name}": value for name, value in vars(cfg.data).items()
                if (name == "path" or name.endswith("_path")) and value}
    settings["eval.rm_all_paths"] = list(cfg.eval.rm_all_paths or [])
    out: dict[str, str | None] = {}
    for name, value in settings.items():
        sources = [value] if isinstance(value, str) else list(value)
        for i, source in enumerate(sources):
            if not isinstance(source, str) or source.startswith((HF_SCHEME, EMBEDDED_SCHEME)):
                continue
            out[name if isinstance(value, str) else f"{name}[{i}]"] = _source_digest(source)
    return out


# Cluster settings that change results: the torch threads of each actor (set from its CPUs) and the
# device (from its GPUs) change float rounding, and the learner layout changes how each step's
# gradient is summed. How many generators/scorers share the work does not: the pools cut work into
# the same seeded batches whatever their size.
RESULT_CLUSTER_FIELDS = ("generator_cpus", "generator_gpus", "scorer_cpus", "scorer_gpus", "learner_workers",
                         "learner_cpus", "learner_use_gpu", "learner_strategy", "deepspeed_stage", "learner_compile")


def run_fingerprint(cfg: Config) -> dict:
    """The settings, input files and software stack every stored phase depends on; a resumed run
    must share them (more rounds or other arms are fine: they only add phases). The stack
    (:func:`apo_ray.game.stack.software_stack`: package versions, CPU kind or GPUs, the dtypes
    chosen, the model files' digests) is checked by :func:`check_store` with its own rules: see there."""
    d = to_dict(cfg)
    apo = {k: v for k, v in d["apo"].items() if k not in ("rounds", "arms", "rm_mode")}
    cluster = {k: d["cluster"][k] for k in RESULT_CLUSTER_FIELDS}
    if cfg.run.in_process:  # one process, no actors: the cluster section plays no part
        cluster = {}
    return {"model": d["model"], "data": d["data"], "generation": d["generation"], "rm": d["rm"],
            "policy": d["policy"], "apo": apo, "seed": d["run"]["seed"], "test_queries": d["eval"]["test_queries"],
            "eval_rm": d["eval"]["eval_rm"], "rm_test": d["eval"]["rm_test"],
            "rm_all_paths": d["eval"]["rm_all_paths"], "in_process": cfg.run.in_process, "cluster": cluster,
            "files": data_file_digests(cfg), "stack": software_stack(cfg)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_store(cfg: Config) -> dict:
    """Check that ``run.output_dir`` may be used as asked, writing nothing; returns the fingerprint.

    - phases there and ``run.resume=false``: refused (another run's results would be mixed in);
    - ``run.resume=true`` and no earlier run there: refused (Hydra's default output folder has a
      timestamp, so a resume that forgets ``run.output_dir`` would silently start from scratch);
    - a missing or unreadable fingerprint beside existing phases: refused, naming the file (the
      settings that wrote the phases cannot be checked);
    - settings or input files that differ from the fingerprint: refused, naming them;
    - another software stack (``stack`` in the fingerprint): refused when what changed alters the
      numbers a phase computes (torch, transformers or vLLM version, DeepSpeed's when the run trains
      with it, torch's CPU kernel level or the CPU flags, the GPUs, the dtypes ``auto`` chose, the
      model files' digests): the stored phases and the new ones would come from different
      computations, and the run would match neither a fresh run on the old stack nor on the new.
      Warned about, naming what changed: Python, Ray (it places the work, the seeded batches are
      the same), NumPy, the CPU's name when its features stay the same. A fingerprint written before
      stacks were recorded is warned about (the stack cannot be checked).
    """
    phases = storage.join(cfg.run.output_dir, "phases")
    marker = storage.join(phases, FINGERPRINT)
    fingerprint = json.loads(json.dumps(run_fingerprint(cfg), default=str))
    stored = [n for n in storage.listdir(phases) if n != FINGERPRINT]
    marker_exists = storage.exists(marker)
    if not cfg.run.resume:
        if stored or marker_exists:
            raise ResumeError(f"{phases} holds phases of an earlier run; pass run.resume=true to continue it "
                              f"or choose another run.output_dir")
        return fingerprint
    if not marker_exists:
        if stored:
            raise ResumeError(f"{marker} is missing but {phases} holds {len(stored)} phase files: the settings "
                              f"that wrote them cannot be checked. Restore the file, or start a new run in "
                              f"another run.output_dir")
        raise ResumeError(f"run.resume=true but {phases} holds no earlier run to continue. Pass the folder of "
                          f"the run to resume as run.output_dir (Hydra's default output folder has a timestamp "
                          f"in its name, so each start gets a new one)")
    try:
        old = json.loads(storage.read_bytes(marker).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        old, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "not a JSON object"
    if not isinstance(old, dict):
        raise ResumeError(f"{marker} is unreadable ({why}), e.g. torn by a crash while it was written: the "
                          f"settings of the stored phases cannot be checked. Restore the file, or start a new "
                          f"run in another run.output_dir")
    old_stack, new_stack = old.get("stack"), fingerprint.get("stack")
    old_flat = _flatten({k: v for k, v in old.items() if k != "stack"})
    new_flat = _flatten({k: v for k, v in fingerprint.items() if k != "stack"})
    changed = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    if changed:
        raise ResumeError(f"run.resume=true but these settings or input files differ from the run in {phases}: "
                          f"{', '.join(changed)}; its stored phases would not match them")
    check_stack(marker, old_stack, new_stack, trains_with_deepspeed=not cfg.run.in_process
                and cfg.cluster.learner_strategy == "deepspeed")
    return fingerprint


def check_stack(marker: Path, old: dict | None, new: dict, *, trains_with_deepspeed: bool = False) -> None:
    """Refuse (:class:`ResumeError`) or warn about a resume on another software stack than the one
    that wrote ``marker`` (the rules: :func:`check_store`, :data:`apo_ray.game.stack.REFUSE`)."""
    if old is None:
        log.warning("%s was written before apo_ray recorded software stacks: the stack of its phases cannot be "
                    "checked (the resumed run's numbers may differ from a fresh run's)", marker)
        return
    refuse, warn = stack_changes(old, new, trains_with_deepspeed=trains_with_deepspeed)
    if refuse:
        raise ResumeError(f"run.resume=true on another software stack than the run in {marker.parent} was computed "
                          f"on: {'; '.join(refuse)}. Its stored phases would not match what this stack computes; "
                          f"resume on the recorded stack ({marker.name}, \"stack\") or start a new run in "
                          f"another run.output_dir")
    if warn:
        log.warning("resuming the run in %s on a changed stack (results unaffected, see check_store): %s",
                    marker.parent, "; ".join(warn))


def open_store(cfg: Config, system: GameSystem | None) -> PhaseStore:
    """The run's phase store under ``run.output_dir``, after :func:`check_store`; a new run's
    fingerprint is written (durably) before any phase."""
    fingerprint = check_store(cfg)
    store = PhaseStore(storage.join(cfg.run.output_dir, "phases"), system)
    marker = storage.join(store.root, FINGERPRINT)
    if not storage.exists(marker):
        write_durably(marker, json.dumps(fingerprint, indent=1).encode("utf-8"))
    return store
