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
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from apo_ray.config import Config, to_dict
from apo_ray.data import EMBEDDED_SCHEME, HF_SCHEME, JSONL_SUFFIXES
from apo_ray.game.system import GameSystem, Weights
from apo_ray.models.loading import cache_dir, load_policy, load_reward_model

log = logging.getLogger(__name__)

FORMAT = 1
FINGERPRINT = "fingerprint.json"


class ResumeError(RuntimeError):
    """The output folder cannot be (re)used as asked; the message names the folder or file."""


# --------------------------------------------------------------------------------------------------
# Durable files
# --------------------------------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX: the entry lives in the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash it holds either its old content or all of ``data``:
    a temporary file, fsynced, renamed over ``path``, then the folder fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path, *, sync: bool = False, chunk_bytes: int = 1 << 22) -> tuple[int, str]:
    """Size in bytes and SHA-256 of ``path`` (one read, mostly from the page cache just after a
    write); with ``sync``, fsync it first."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if sync:
            os.fsync(fh.fileno())
        while block := fh.read(chunk_bytes):
            digest.update(block)
        size = fh.tell()
    return size, digest.hexdigest()


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
    from safetensors.torch import save_file

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
    tmp = path.with_name(path.name + ".tmp")
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


def _marker_of(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(path.suffix) + ".json")


def _check_against_marker(path: Path) -> None:
    """A base file must be the one its phase recorded (a changed base would change every version
    built on it without a word)."""
    marker_path = _marker_of(path)
    if not marker_path.exists():
        return
    recorded = (json.loads(marker_path.read_bytes().decode("utf-8")).get("weights") or {})
    size, sha256 = file_sha256(path)
    if size != recorded.get("bytes") or sha256 != recorded.get("sha256"):
        raise ValueError(f"{path} is not the file {marker_path.name} recorded ({size} bytes, recorded "
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

    path = Path(path)
    chain: list[tuple[Path, dict[str, torch.Tensor], list]] = []  # the version first, then its bases
    start: dict[str, torch.Tensor] | None = None
    while True:
        if path.suffix == LEGACY_SUFFIX:
            start = torch.load(path, map_location="cpu", weights_only=True)
            break
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
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
        base_path = path.with_name(checkpoint_name(base))
        if not base_path.exists() and base_path.with_suffix(LEGACY_SUFFIX).exists():
            base_path = base_path.with_suffix(LEGACY_SUFFIX)
        if not base_path.exists():
            raise FileNotFoundError(f"{path}: its base version {base} ({base_path.name}) is missing from "
                                    f"{path.parent}")
        _check_against_marker(base_path)
        if any(p == base_path for p, _, _ in chain):
            raise ValueError(f"{path}: its chain of base versions loops at {base_path.name}")
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

    def __init__(self, root: Path, system: GameSystem | None):
        self.root = Path(root)
        self.system = system
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / (key.replace("/", "__") + suffix)

    def _quarantine(self, key: str, why: str) -> None:
        """Move the phase's files aside (kept for a post-mortem) so it is computed again."""
        for suffix in (".json", CHECKPOINT_SUFFIX, LEGACY_SUFFIX):
            path = self._path(key, suffix)
            if path.exists():
                path.replace(path.with_name(path.name + ".corrupt"))
        log.warning("%s: %s; moved aside to %s.corrupt, the phase will be computed again",
                    self._path(key, ".json"), why, self._path(key, ".json").name)

    def _marker(self, key: str) -> dict | None:
        """The checked marker of a finished phase; None when it is not finished or does not check out."""
        path = self._path(key, ".json")
        if not path.exists():
            return None
        try:
            marker = json.loads(path.read_bytes().decode("utf-8"))
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
        pt = self.root / expected.get("file", checkpoint_name(key, LEGACY_SUFFIX))  # no "file": a legacy .pt
        if not pt.exists():
            self._quarantine(key, f"its weights file {pt.name} is missing")
            return None
        if pt.stat().st_size != expected.get("bytes") or file_sha256(pt)[1] != expected.get("sha256"):
            self._quarantine(key, f"its weights file {pt.name} is not the one it recorded "
                                  f"({pt.stat().st_size} bytes, recorded {expected.get('bytes')})")
            return None
        try:
            handle = self.system.load_weights(pt)
        except Exception as exc:  # noqa: BLE001 - a file that passed the checksum but does not load
            self._quarantine(key, f"{pt.name} does not load ({type(exc).__name__}: {exc})")
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
        self.put(key, stats, weights={"file": pt.name, "bytes": size, "sha256": sha256,
                                      "base": base})  # the .json marks them complete
        return Weights(key, handle, str(pt))

    def version_stats(self, key: str) -> dict:
        return self.get(key) or {}

    def has(self, key: str) -> bool:
        """Whether ``key`` has a marker (checked for integrity when it is read)."""
        return self._path(key, ".json").exists()

    def version_path(self, key: str) -> Path:
        """The checkpoint of a finished weights phase (:func:`load_checkpoint` reads it whole)."""
        path = self._path(key, CHECKPOINT_SUFFIX)
        legacy = self._path(key, LEGACY_SUFFIX)
        return legacy if legacy.exists() and not path.exists() else path

    def weights_keys(self) -> list[str]:
        """Keys of every finished weights phase (a checkpoint with its ``.json`` marker)."""
        return sorted({p.name.removesuffix(p.suffix).replace("__", "/")
                       for suffix in (CHECKPOINT_SUFFIX, LEGACY_SUFFIX) for p in self.root.glob(f"*{suffix}")
                       if _marker_of(p).exists()})


# --------------------------------------------------------------------------------------------------
# The resume fingerprint
# --------------------------------------------------------------------------------------------------

_digest_lock = threading.Lock()
_digests: dict[str, dict] = {}  # this process's copy of the on-disk digest cache


def _digest_cache_path() -> Path:
    return cache_dir() / "file_digests.json"


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, cached by (path, size, mtime): a 100 MB data file is read once,
    not at every start. A file rewritten in place gets a new mtime and so is read again."""
    path = Path(path).resolve()
    stat = path.stat()
    ident = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = _digest_cache_path()
    with _digest_lock:
        if not _digests and cache_file.exists():
            try:
                _digests.update(json.loads(cache_file.read_text()))
            except (ValueError, OSError):  # a damaged cache only costs a re-read
                pass
        hit = _digests.get(str(path))
        if hit and {k: hit.get(k) for k in ident} == ident:
            return hit["sha256"]
    sha256 = file_sha256(path)[1]
    with _digest_lock:
        _digests[str(path)] = ident | {"sha256": sha256}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_digests))
            os.replace(tmp, cache_file)
        except OSError as exc:  # read-only home: the digest is still right, only not remembered
            log.debug("cannot write %s: %s", cache_file, exc)
    return sha256


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
    """The settings and input files every stored phase depends on; a resumed run must share them
    (more rounds or other arms are fine: they only add phases)."""
    d = to_dict(cfg)
    apo = {k: v for k, v in d["apo"].items() if k not in ("rounds", "arms", "rm_mode")}
    cluster = {k: d["cluster"][k] for k in RESULT_CLUSTER_FIELDS}
    if cfg.run.in_process:  # one process, no actors: the cluster section plays no part
        cluster = {}
    return {"model": d["model"], "data": d["data"], "generation": d["generation"], "rm": d["rm"],
            "policy": d["policy"], "apo": apo, "seed": d["run"]["seed"], "test_queries": d["eval"]["test_queries"],
            "eval_rm": d["eval"]["eval_rm"], "rm_test": d["eval"]["rm_test"],
            "rm_all_paths": d["eval"]["rm_all_paths"], "in_process": cfg.run.in_process, "cluster": cluster,
            "files": data_file_digests(cfg)}


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
    - settings or input files that differ from the fingerprint: refused, naming them.
    """
    phases = Path(cfg.run.output_dir) / "phases"
    marker = phases / FINGERPRINT
    fingerprint = json.loads(json.dumps(run_fingerprint(cfg), default=str))
    stored = [p for p in phases.iterdir() if p.name != FINGERPRINT] if phases.is_dir() else []
    if not cfg.run.resume:
        if stored or marker.exists():
            raise ResumeError(f"{phases} holds phases of an earlier run; pass run.resume=true to continue it "
                              f"or choose another run.output_dir")
        return fingerprint
    if not marker.exists():
        if stored:
            raise ResumeError(f"{marker} is missing but {phases} holds {len(stored)} phase files: the settings "
                              f"that wrote them cannot be checked. Restore the file, or start a new run in "
                              f"another run.output_dir")
        raise ResumeError(f"run.resume=true but {phases} holds no earlier run to continue. Pass the folder of "
                          f"the run to resume as run.output_dir (Hydra's default output folder has a timestamp "
                          f"in its name, so each start gets a new one)")
    try:
        old = json.loads(marker.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        old, why = None, f"{type(exc).__name__}: {exc}"
    else:
        why = "not a JSON object"
    if not isinstance(old, dict):
        raise ResumeError(f"{marker} is unreadable ({why}), e.g. torn by a crash while it was written: the "
                          f"settings of the stored phases cannot be checked. Restore the file, or start a new "
                          f"run in another run.output_dir")
    old_flat, new_flat = _flatten(old), _flatten(fingerprint)
    changed = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    if changed:
        raise ResumeError(f"run.resume=true but these settings or input files differ from the run in {phases}: "
                          f"{', '.join(changed)}; its stored phases would not match them")
    return fingerprint


def open_store(cfg: Config, system: GameSystem | None) -> PhaseStore:
    """The run's phase store under ``run.output_dir``, after :func:`check_store`; a new run's
    fingerprint is written (durably) before any phase."""
    fingerprint = check_store(cfg)
    store = PhaseStore(Path(cfg.run.output_dir) / "phases", system)
    marker = store.root / FINGERPRINT
    if not marker.exists():
        write_durably(marker, json.dumps(fingerprint, indent=1).encode("utf-8"))
    return store
