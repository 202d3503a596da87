"""The files a finished run leaves beside its phases: summary.json, resolved_config.json,
run_timing.json and report.md."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from apo_ray.config import Config, to_dict
from apo_ray.core.arms import scored_by_rm_base_warning
from apo_ray.game.loop import APOGame
from apo_ray.game.stack import model_digest_line, software_stack, stack_line
from apo_ray.outputs.report import write_report

log = logging.getLogger(__name__)


def finish_run(cfg: Config, game: APOGame, records: list[dict], *, wall_seconds: float,
               judge: dict | None = None, cpu_seconds: float | None = None) -> Path:
    """Write ``summary.json``, ``resolved_config.json``, ``run_timing.json`` (wall seconds of the
    game; CPU seconds of the process that played it, which in process is all of its work) and
    ``report.md`` with its tables and plots."""
    out = Path(cfg.run.output_dir)
    stack = software_stack(cfg)
    write_summary(out, records, to_dict(cfg), stack=stack)
    (out / "run_timing.json").write_text(json.dumps(
        {"wall_seconds": wall_seconds, "process_cpu_seconds": cpu_seconds, "in_process": cfg.run.in_process,
         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    d = game.data
    if game.eval_rm.id == game.rm_base.id:  # report.md carries it too, at the top
        log.warning(scored_by_rm_base_warning(cfg.arms))
    test_from = f"from `{cfg.data.test_path}`" if cfg.data.test_path else "cut from the data"
    sizes = {"rm/eval": f"held out, {len(d.eval_rm_pairs)} pairs",
             "rm/eval_test": f"RM_Test, {len(d.train_pairs)} pairs",
             "rm/eval_all": f"RM_All, {len(d.train_pairs) + len(d.rm_all_extra_pairs)} pairs"}
    if game.eval_rm.id == game.rm_base.id:
        eval_note = "Evaluation RMs: none; RM_Base scores Table 3 (see the warning above)."
    else:
        eval_note = (f"Evaluation RMs (no arm trains against them): "
                     f"{', '.join(f'{k} ({sizes[k]})' for k in game.eval_rms)}; `{game.eval_rm.id}` scores Table 3.")
    notes = [(f"Policy `{cfg.model.policy}`, RM backbone `{cfg.model.reward}`; {cfg.apo.rounds} rounds, "
              f"S = {cfg.apo.samples_per_query}, beta2 = {cfg.apo.beta2}, APO weight = {cfg.apo.apo_weight} "
              f"({cfg.apo.loss_reduction} RM loss), policy objective {cfg.policy.objective}."),
             (f"Data `{cfg.data.path}`: {len(d.pref_pairs)} D_P pairs, {len(d.gold)} golden queries "
              f"(gold: {d.gold_source}), {len(d.llm_queries)} LLM queries, {len(d.dev_pairs)} dev / "
              f"{len(d.test_pairs)} test pairs ({test_from})."),
             eval_note,
             f"Stack: {stack_line(stack)}.",
             f"Model weights (sha256): {model_digest_line(stack)}.",
             f"Wall time {wall_seconds / 60:.1f} min."]
    return write_report(out, records, judge=judge, notes=notes, title=f"APO run `{cfg.run.name}`")


def write_summary(output_dir: Path, records: list[dict], resolved_config: dict, stack: dict | None = None) -> Path:
    """``summary.json``: one record per (round, arm), each naming the ``stack`` that produced it
    (:func:`apo_ray.game.stack.software_stack`) when given; ``resolved_config.json`` beside it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "resolved_config.json").write_text(json.dumps(resolved_config, indent=2, default=str))
    if stack is not None:
        records = [{**r, "stack": stack} for r in records]
    path = output_dir / "summary.json"
    path.write_text(json.dumps(records, indent=2))
    return path
