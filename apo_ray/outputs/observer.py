"""What a person takes away from a run, fed by the game's events (:mod:`apo_ray.game.events`; the
same events :meth:`apo_ray.runtime.telemetry.APOMetrics.on_event` gets): a progress line per phase with the run's ETA
(:mod:`apo_ray.outputs.progress`), the trackers of ``run.tracking`` (:mod:`apo_ray.outputs.tracking`) and Hugging
Face folders of the model versions (:mod:`apo_ray.outputs.export`, ``run.save_models``).

``runtime.play.play_game`` uses it the same way in one process and in the driver actor::

    with RunObserver(cfg, store, data) as observer:
        APOGame(cfg, system, data, store, on_event=observer.on_event).run()

A tracker that fails mid-run is logged and dropped: losing a log must not lose a run.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apo_ray.config import Config, to_dict
from apo_ray.game.events import ArmRoundFinished, GameEvent, PhaseFinished, RoundFinished
from apo_ray.game.plan import plan_phases
from apo_ray.outputs.export import BackgroundExporter, generation_config_values
from apo_ray.outputs.progress import RunProgress, format_seconds, rate_unit, store_done_keys
from apo_ray.outputs.tracking import make_trackers

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger("apo_ray.outputs.progress")

ANSWER_ROWS = 8  # sample answers per (round, arm) in the trackers' tables
_LAST_TURN = re.compile(r"Human:(?!.*Human:)(.*?)(?:\n\nAssistant:\s*)?$", re.DOTALL)


def policy_generation_config(cfg: Config) -> dict:
    """``generation_config.json`` values for exported policies: the decoding settings of the
    policy's test answers (``generation.testing``) and the run's stop strings."""
    return generation_config_values(cfg.generation.testing, cfg.generation.stop)


def _last_turn(prompt: str, limit: int = 300) -> str:
    match = _LAST_TURN.search(prompt)
    text = (match.group(1) if match else prompt).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


class RunObserver:
    def __init__(self, cfg: Config, store, data, *, plan: bool = True):
        self.cfg, self.store, self.data = cfg, store, data
        config = json.loads(json.dumps(to_dict(cfg), default=str))
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Written now too (finish_run rewrites it): jobs/export.py needs it for a stopped run.
        (out / "resolved_config.json").write_text(json.dumps(config, indent=2))
        self.trackers = make_trackers(cfg, config)
        planned = plan_phases(cfg, data) if plan else []
        self.progress = RunProgress(planned, store_done_keys(store, planned))
        self.exporter = None
        if cfg.run.save_models != "none":
            self.exporter = BackgroundExporter(
                out / "models", store.version_path, policy_model=cfg.model.policy, reward_model=cfg.model.reward,
                save_models=cfg.run.save_models, last_round=cfg.apo.rounds, generation=policy_generation_config(cfg),
                merged=cfg.run.export_merged)
        self._phase_no = 0
        self._evaluate: dict[tuple, float] = defaultdict(float)
        log.info("run plan: %d phases (%d already done)", self.progress.total, self.progress.done)

    # -- events ------------------------------------------------------------------------------------
    def on_event(self, event: GameEvent) -> None:
        """One event of the game: a finished phase, arm-round or round."""
        if isinstance(event, ArmRoundFinished):
            self._round_done(event)
        elif isinstance(event, RoundFinished):  # what the system holds after the round (the game logs the line)
            self._log({f"system/{k}": v for k, v in event.usage.items() if isinstance(v, (int, float))}
                      | {"system/live_versions": len(event.live_versions)}, event.round, "round")
        elif isinstance(event, PhaseFinished):
            self._phase_finished(event)

    def _phase_finished(self, event: PhaseFinished) -> None:
        self._phase_no += 1
        phase, generation, stats, count, scalars = event.phase, event.generation, event.train, event.items, {}
        if stats is not None:  # a learner phase: its per-step losses and learning rates
            for step, loss in enumerate(stats.get("losses", []), start=1):
                lrs = stats.get("lrs") or []
                values = {f"learner/{event.key}/loss": loss}
                if step <= len(lrs):
                    values[f"learner/{event.key}/lr"] = lrs[step - 1]
                self._log(values, step, "learner_step")
            if stats.get("tokens_per_s"):
                scalars[f"phase/{phase}/tokens_per_s"] = stats["tokens_per_s"]
        unit = rate_unit(phase)
        line = self.progress.on_phase(event, count, unit)
        if generation and generation.get("new_tokens"):
            scalars[f"phase/{phase}/tokens_per_s"] = generation["new_tokens"] / max(event.seconds, 1e-9)
            line = line.replace(" | ", f", {scalars[f'phase/{phase}/tokens_per_s']:.0f} tokens/s | ", 1)
        scalars[f"phase/{phase}/seconds"] = event.seconds
        if count:
            scalars[f"phase/{phase}/{unit.replace('/', '_per_')}"] = count / max(event.seconds, 1e-9)
        scalars |= self._progress_scalars()
        self._log(scalars, self._phase_no, "phase")
        if phase == "evaluate":  # many small scoring calls: one line per evaluation, at the arm-round's end
            self._evaluate[(event.round, event.arm)] += event.seconds
        else:
            log.info(line)

    def _progress_scalars(self) -> dict:
        summary = self.progress.summary()
        values = {"run/phases_done": summary["phases_done"],
                  "run/progress_pct": 100 * summary["phases_done"] / max(summary["phases_planned"], 1)}
        if summary["eta_s"] is not None:
            values["run/eta_s"] = summary["eta_s"]
        return values

    def _round_done(self, event: ArmRoundFinished) -> None:
        r, arm, record = event.round, event.arm, event.record
        values = {f"policy/{arm}/mean_reward": record["policy_mean_reward"],
                  f"policy/{arm}/reward_stderr": record.get("policy_reward_stderr", 0.0)}
        if "best_of_s_mean_score" in record:
            values[f"policy/{arm}/best_of_s_mean_score"] = record["best_of_s_mean_score"]
        for split in ("dev", "test"):
            for metric in ("acc", "ece", "ace"):
                if f"rm_{split}_{metric}" in record:
                    values[f"rm/{arm}/{split}_{metric}"] = record[f"rm_{split}_{metric}"]
        self._log(values, r, "round")
        if event.test_answers and event.test_scores:
            rows = [[r, arm, _last_turn(p), a, s] for p, a, s in list(zip(
                event.test_prompts, event.test_answers, event.test_scores))[:ANSWER_ROWS]]
            self._table(f"answers/round_{r}/{arm}", ["round", "arm", "prompt (last turn)", "answer",
                                                     "evaluation-RM score"], rows, r)
        if self.exporter is not None:
            self.exporter.submit_record(record)
        seconds = self._evaluate.pop((r, arm), 0.0)
        summary = self.progress.summary()
        eta = f", ETA {format_seconds(summary['eta_s'])}" if summary["eta_s"] and self.progress.remaining else ""
        log.info("[%d/%d] round %d arm %s: evaluated in %.1fs: RM test acc %.3f ECE %.3f, policy score %.3f | "
                 "run %.0f%% done, elapsed %s%s", summary["phases_done"], summary["phases_planned"], r, arm, seconds,
                 record.get("rm_test_acc", float("nan")), record.get("rm_test_ece", float("nan")),
                 record["policy_mean_reward"], 100 * summary["phases_done"] / max(summary["phases_planned"], 1),
                 format_seconds(summary["elapsed_s"]), eta)

    # -- fan-out to trackers -----------------------------------------------------------------------
    def _each(self, call: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception:  # see the module docstring
                log.exception("tracker %s failed; it logs nothing more in this run", type(tracker).__name__)
                self.trackers.remove(tracker)

    def _log(self, values: dict, step: int, axis: str) -> None:
        if values:
            self._each("log_scalars", values, step, axis)

    def _table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self._each("log_table", name, columns, rows, step)

    # -- end ---------------------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Wait for the model exports, attach the report to MLflow, close the trackers. Raises if an
        export failed (after everything else is closed)."""
        error = None
        try:
            if self.exporter is not None:
                self.exporter.close()
        except RuntimeError as exc:
            error = exc
        out = Path(self.cfg.run.output_dir)
        for tracker in self.trackers:
            if hasattr(tracker, "log_file"):
                for name in ("report.md", "summary.json"):
                    self._each_one(tracker, "log_file", out / name)
        for tracker in self.trackers:
            self._each_one(tracker, "close", failed or error is not None)
        log.info("run %s after %s: %d of %d phases", "failed" if failed else "finished",
                 format_seconds(self.progress.summary()["elapsed_s"]), self.progress.done, self.progress.total)
        if error is not None and not failed:
            raise error

    @staticmethod
    def _each_one(tracker, call: str, *args) -> None:
        try:
            getattr(tracker, call)(*args)
        except Exception:
            log.exception("tracker %s: %s failed", type(tracker).__name__, call)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)
