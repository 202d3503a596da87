"""The run's checkpoint: finished phases on disk, and the fingerprint a resumed run must match.

Each phase of :class:`apo_ray.game.APOGame` is stored under a key naming what it was computed from;
``open_store`` refuses to mix runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apo_ray.config import Config

if TYPE_CHECKING:
    from apo_ray.game import GameSystem, Weights


class PhaseStore:
    """Results of finished phases on disk: ``<dir>/<key>.json`` plus ``<key>.pt`` for weights.
    A key is written last-step-atomically (temp file + rename), so a killed run never leaves a
    half-written result that looks finished."""

    def __init__(self, root: Path, system: GameSystem):
        self.root = Path(root)
        self.system = system
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / (key.replace("/", "__") + suffix)

    def get(self, key: str) -> Any | None:
        path = self._path(key, ".json")
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: Any) -> None:
        path = self._path(key, ".json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)

    def get_weights(self, key: str) -> Weights | None:
        meta = self.get(key)
        if meta is None:
            return None
        from apo_ray.game import Weights

        return Weights(key, self.system.load_weights(self._path(key, ".pt")))

    def put_weights(self, key: str, handle: Any, stats: dict) -> Weights:
        self.system.save_weights(handle, self._path(key, ".pt"))
        self.put(key, stats)  # the .json marks the weights as complete
        from apo_ray.game import Weights

        return Weights(key, handle)

    def weights_stats(self, key: str) -> dict:
        return self.get(key) or {}


def run_fingerprint(cfg: Config) -> dict:
    """The settings every stored phase depends on; a resumed run must share them (more rounds or
    other arms are fine: they only add phases)."""
    from apo_ray.config import to_dict

    d = to_dict(cfg)
    apo = {k: v for k, v in d["apo"].items() if k not in ("rounds", "arms", "rm_mode")}
    return {"model": d["model"], "data": d["data"], "generation": d["generation"], "rm": d["rm"],
            "policy": d["policy"], "apo": apo, "seed": d["run"]["seed"], "test_queries": d["eval"]["test_queries"],
            "eval_rm": d["eval"]["eval_rm"]}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def open_store(cfg: Config, system: GameSystem) -> PhaseStore:
    """The run's phase store under ``run.output_dir``. Refuses to mix runs: existing phases need
    ``run.resume=true`` and the same settings as the run that wrote them."""
    phases = Path(cfg.run.output_dir) / "phases"
    marker = phases / "fingerprint.json"
    fingerprint = json.loads(json.dumps(run_fingerprint(cfg), default=str))
    if phases.exists() and any(phases.iterdir()):
        if not cfg.run.resume:
            raise RuntimeError(f"{phases} holds phases of an earlier run; pass run.resume=true to continue it "
                               f"or choose another run.output_dir")
        if marker.exists():
            old, new = _flatten(json.loads(marker.read_text())), _flatten(fingerprint)
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if changed:
                raise RuntimeError(f"run.resume=true but these settings differ from the run in {phases}: "
                                   f"{', '.join(changed)}; its stored phases would not match them")
    store = PhaseStore(phases, system)
    if not marker.exists():
        marker.write_text(json.dumps(fingerprint, indent=1))
    return store
