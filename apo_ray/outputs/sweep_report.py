"""One report for a sweep: every point's results side by side (files in, files out).

A sweep is a folder of runs (Hydra multirun: ``multirun/<name>/<time>/<n>/``; ``jobs/sweep.py``:
``<output-root>/<point>/``), each with ``summary.json`` and ``resolved_config.json``. The swept
settings are the config values that differ between the runs, so the report needs no record of how
the sweep was launched. It writes into the sweep folder:

- ``sweep_report.md``: one table, a row per (point, arm, round) with the swept values, RM test
  accuracy / ECE / ACE and the policy's evaluation-RM score, and the plots;
- ``sweep_summary.csv``: the same rows;
- ``sweep_<setting>.png`` per swept setting: that setting against RM test accuracy, RM test ECE and
  policy score, a line per arm and round.

:class:`HydraSweepReport` runs it at the end of a Hydra multirun (configured in ``conf/config.yaml``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from apo_ray.outputs.tables import ARM_COLORS, arm_label, format_markdown_table
from apo_ray.outputs.tracking import flatten

log = logging.getLogger(__name__)

# Settings that differ between points without being swept (where each point writes, its name).
NOT_SWEPT = ("run.output_dir", "run.name", "cluster.namespace", "run.resume")
METRICS = (("rm_test_acc", "RM test accuracy"), ("rm_test_ece", "RM test ECE"),
           ("policy_mean_reward", "policy score (evaluation RM)"))


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tracking.flatten`` with lists as JSON text, so a swept list compares and prints as one value."""
    return {key: json.dumps(value) if isinstance(value, list) else value for key, value in flatten(tree).items()}


def find_points(root: Path) -> list[dict]:
    """Every finished run under ``root`` (at most two levels down): ``{"dir", "config", "records"}``."""
    root = Path(root)
    points = []
    for summary in sorted([*root.glob("summary.json"), *root.glob("*/summary.json"), *root.glob("*/*/summary.json")]):
        config = summary.with_name("resolved_config.json")
        if not config.exists():
            log.warning("%s has no resolved_config.json beside it; skipped", summary)
            continue
        points.append({"dir": summary.parent, "config": _flatten(json.loads(config.read_text())),
                       "records": json.loads(summary.read_text())})
    return points


def swept_settings(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose values differ between points, in config order."""
    keys = list(dict.fromkeys(k for p in points for k in p["config"]))
    return [k for k in keys if k not in NOT_SWEPT and len({repr(p["config"].get(k)) for p in points}) > 1]


def sweep_rows(points: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> list[dict]:
    rows = []
    for p in points:
        for r in sorted(p["records"], key=lambda r: (r["round"], r["rm_mode"])):
            rows.append({**{k: p["config"].get(k) for k in swept}, "arm": r["rm_mode"], "round": r["round"],
                         **{m: r.get(m) for m, _ in METRICS}, "rm_test_ace": r.get("rm_test_ace"),
                         "policy_reward_stderr": r.get("policy_reward_stderr"), "run": str(p["dir"])})
    return rows


def _sort_key(value: Any) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0.0, str(value))


def _plot(path: Path, setting: str, rows: Sequence[Mapping[str, Any]], swept: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted({r[setting] for r in rows}, key=_sort_key)
    numeric = all(_sort_key(v)[0] == 0 for v in values)
    others = [k for k in swept if k != setting]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), squeeze=False)
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((r["arm"], r["round"], *(r[k] for k in others)), []).append(r)
    rounds = sorted({r["round"] for r in rows})
    styles = ["-", "--", ":", "-."]
    for ax, (metric, title) in zip(axes[0], METRICS):
        for (arm, rnd, *rest), points in sorted(lines.items(), key=lambda kv: repr(kv[0])):
            points = sorted((p for p in points if p[metric] is not None), key=lambda p: _sort_key(p[setting]))
            if not points:
                continue
            xs = [p[setting] if numeric else values.index(p[setting]) for p in points]
            label = f"{arm_label(arm)} r{rnd}" + "".join(f" {k}={v}" for k, v in zip(others, rest))
            ax.plot(xs, [p[metric] for p in points], marker="o", color=ARM_COLORS.get(arm),
                    linestyle=styles[rounds.index(rnd) % len(styles)], label=label)
        ax.set_xlabel(setting)
        ax.set_title(title)
        if numeric and all(v > 0 for v in values) and max(values) / min(values) >= 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_sweep_report(root: str | Path) -> Path:
    """Write ``sweep_report.md``, ``sweep_summary.csv`` and the plots into ``root``; returns the report."""
    root = Path(root)
    points = find_points(root)
    if not points:
        raise FileNotFoundError(f"{root}: no finished run (summary.json + resolved_config.json) in it or below it")
    swept = swept_settings(points)
    rows = sweep_rows(points, swept)
    columns = [*swept, "arm", "round", "rm_test_acc", "rm_test_ece", "rm_test_ace", "policy_mean_reward",
               "policy_reward_stderr", "run"]
    with open(root / "sweep_summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plots = []
    for setting in swept:
        name = f"sweep_{setting.replace('.', '_')}.png"
        _plot(root / name, setting, rows, swept)
        plots.append((setting, name))

    def fmt(v: Any, digits: int = 3, scale: float = 1.0) -> Any:
        return f"{scale * v:.{digits}f}" if isinstance(v, float) else ("–" if v is None else v)

    def where(run: str) -> str:
        return str(Path(run).relative_to(root)) if Path(run).is_relative_to(root) else run

    table_rows = [[*(r[k] for k in swept), arm_label(r["arm"]), r["round"], fmt(r["rm_test_acc"], 2, 100),
                   fmt(r["rm_test_ece"]), fmt(r["rm_test_ace"]),
                   f"{fmt(r['policy_mean_reward'])} ± {fmt(r['policy_reward_stderr'])}", where(r["run"])]
                  for r in rows]
    headers = [*swept, "arm", "round", "RM test acc (%)", "RM test ECE", "RM test ACE", "policy score ± stderr", "run"]
    what = ", ".join(f"`{k}`" for k in swept) or "nothing (the runs share every setting)"
    lines = [f"# Sweep report: `{root}`", "",
             f"{len(points)} runs; swept: {what}. Policy score: mean evaluation-RM score of the policy's test answers.",
             "", format_markdown_table(headers, table_rows), ""]
    for setting, name in plots:
        lines += [f"![{setting}]({name})", ""]
    path = root / "sweep_report.md"
    path.write_text("\n".join(lines))
    log.info("sweep report: %s (%d runs, swept %s)", path, len(points), swept)
    return path


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class HydraSweepReport(Callback):
    """Hydra callback: writes the sweep report into ``hydra.sweep.dir`` when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            print(f"sweep report: {write_sweep_report(root)}", flush=True)
        except FileNotFoundError as err:
            log.warning("no sweep report: %s", err)
