"""Experiment trackers through their own libraries, all offline by default (``run.tracking``).

- ``tensorboard``: event files written by ``torch.utils.tensorboard.SummaryWriter`` under
  ``<output_dir>/tracking/tensorboard`` (``tensorboard --logdir <output_dir>/tracking``).
- ``mlflow``: a run in an MLflow store; by default ``sqlite:///<output_dir>/tracking/mlflow.db`` with
  artifacts beside it. MLflow 3 keeps the plain file store (``./mlruns``) in maintenance mode and
  refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, so the local store is its SQLite one.
  ``run.mlflow_tracking_uri`` (or ``$MLFLOW_TRACKING_URI``) points elsewhere, e.g. a team server.
- ``wandb``: a W&B run in offline mode under ``<output_dir>/tracking/wandb`` (``wandb sync`` uploads
  it later); ``WANDB_MODE=online`` logs live instead.

Every tracker takes the same four calls: the resolved config once, scalars on a named step axis
(``round``, ``phase``: the run's phase counter, ``learner_step``: the step within one learner
phase), tables of text, and close. Why not Ray's integrations (``ray.air.integrations``): their
logger callbacks are Ray Tune callbacks (Ray Train V2's ``RunConfig`` takes none), and
``setup_mlflow``/``setup_wandb`` open a run inside a Ray Train worker; our learner workers serve
many phases and see only training, while the driver sees every phase, so one run per APO run is
logged from the driver (which gets each learner phase's per-step losses in its stats).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from apo_ray.config import TRACKERS, ConfigError
from apo_ray.outputs.tables import format_markdown_table

log = logging.getLogger(__name__)

# The module each tracker needs, and the pip extra of apo-ray that installs it.
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class TrackerUnavailable(ConfigError):
    """``run.tracking`` names a tracker whose package is not installed."""


def require_tracker(name: str):
    """Import the tracker's library or raise :class:`TrackerUnavailable` naming the extra to install."""
    if name not in TRACKERS:
        raise ConfigError(f"run.tracking: unknown tracker {name!r}; choose from {TRACKERS}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as err:
        raise TrackerUnavailable(f"run.tracking includes {name!r} but its package is not installed "
                                 f"({err}); install it with: pip install 'apo-ray[{name}]'") from None


class Tracker(Protocol):
    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_scalars(self, values: Mapping[str, float], step: int, axis: str) -> None: ...

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        require_tracker("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), flush_secs=10)

    def log_config(self, config):
        import yaml

        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```", 0)

    def log_scalars(self, values, step, axis):
        for key, value in values.items():
            self.writer.add_scalar(key, float(value), step)

    def log_table(self, name, columns, rows, step):
        rows = [[f"{v:.4g}" if isinstance(v, float) else v for v in row] for row in rows]
        self.writer.add_text(name, format_markdown_table(columns, rows), step)

    def close(self, failed=False):
        self.writer.close()


class MLflowTracker:
    """One MLflow run, logged through ``MlflowClient`` with explicit run ids (no global active run,
    so several runs in one process, e.g. Hydra multirun points, never mix)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, artifact_dir: Path,
                 tags: Mapping[str, str] | None = None):
        require_tracker("mlflow")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=Path(artifact_dir).resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id

    def log_config(self, config):
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for lo in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[lo:lo + 100])
        self.client.log_dict(self.run_id, dict(config), "resolved_config.json")

    def log_scalars(self, values, step, axis):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(step)) for key, value in values.items()]
        for lo in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[lo:lo + 1000])

    def log_table(self, name, columns, rows, step):
        data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{name}.json")

    def log_file(self, path: Path) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path))

    def close(self, failed=False):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker:
    """A W&B run, offline unless ``WANDB_MODE`` says otherwise. Each metric is bound to its own
    step axis (``define_metric``): W&B's own step must only grow, and our axes interleave."""

    def __init__(self, run_dir: Path, project: str, run_name: str, config: Mapping[str, Any]):
        wandb = require_tracker("wandb")
        self.wandb = wandb
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(run_dir), project=project,
                              name=run_name, config=dict(config),
                              settings=wandb.Settings(console="off", silent=True))
        self._bound: set[str] = set()

    def log_config(self, config):
        pass  # given to wandb.init

    def log_scalars(self, values, step, axis):
        if axis not in self._bound:
            self.run.define_metric(axis)
            self._bound.add(axis)
        for key in values:
            if key not in self._bound:
                self.run.define_metric(key, step_metric=axis)
                self._bound.add(key)
        self.run.log({**{k: float(v) for k, v in values.items()}, axis: step})

    def log_table(self, name, columns, rows, step):
        self.run.log({name: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def make_trackers(cfg, config: Mapping[str, Any]) -> list[Tracker]:
    """The trackers ``cfg.run.tracking`` selects, writing under ``<output_dir>/tracking``."""
    out = Path(cfg.run.output_dir)
    root = out / "tracking"
    run_name = f"{cfg.run.name}/{out.name}"
    trackers: list[Tracker] = []
    for name in dict.fromkeys(cfg.run.tracking):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(root / "tensorboard"))
        elif name == "mlflow":
            uri = cfg.run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
                f"sqlite:///{(root / 'mlflow.db').resolve()}"
            root.mkdir(parents=True, exist_ok=True)
            trackers.append(MLflowTracker(uri, cfg.run.name, run_name, root / "mlflow-artifacts",
                                          tags={"apo_ray.output_dir": str(out)}))
        elif name == "wandb":
            trackers.append(WandbTracker(root, cfg.run.wandb_project, run_name, config))
        else:
            require_tracker(name)  # raises: unknown name
        trackers[-1].log_config(config)
    return trackers
