"""Does APO do what the paper says, at this scale? A preset for several seeds, then the paper's
claims judged across them (a benchmark: a seed of hh_small takes ~45 min on 2 cores, of rm_claims
see docs/science/design.md).

    python benchmarks/science.py                                  # hh_small, seeds 0,1,2 -> docs/science/
    python benchmarks/science.py --preset rm_claims --seeds $(seq -s, 0 39) \
        --runs-dir outputs/rm_claims --out docs/science/rm_claims  # the RM claims (Holm over 5 claims)
    python benchmarks/science.py --seeds 0,1,2,3,4 -- apo.rounds=2  # overrides after -- go to every run
    python benchmarks/science.py --report-only                    # only rewrite the report from the runs

It runs the seeds as Hydra multiruns over ``run.seed`` (``data.seed`` stays fixed, so every seed
has the same blocks and test items):

    python jobs/apo.py -m experiment=<preset> run.seed=<seeds> run.in_process=true run.resume=<r> \
        hydra.sweep.dir=<runs-dir> hydra.sweep.subdir=seed${run.seed}

one seed after another in one process (``run.in_process``: the same game as on Ray, without a Ray
instance to share the 2 cores with; one process also keeps the frozen-block states of every text
for every later seed). Seeds stopped part-way run first with ``run.resume=true`` (they continue
from their last finished phase), fresh seeds after them with ``run.resume=false``; finished seeds
are kept. Then :func:`apo_ray.outputs.claims.write_claims_report` writes ``report.md``,
``claims.json`` and the figures into ``--out``, with the machine (CPU flags, cores, load average
while it ran), every seed's wall and CPU time, and the seconds each kind of phase took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import positive_int

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> dict:
    """The CPU's model name and which of FLAGS it has (what ``dtype: auto`` decides from)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set()
    model = platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
        elif line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
    return {"model": model, "cores": os.cpu_count(), "flags": sorted(f for f in FLAGS if f in flags)}


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``interval`` seconds while the runs go (the machine is shared).
    With ``prune`` (run folders in the order the sweep runs them) it also deletes the weight files of
    every seed whose job has ended: the report reads only scores, and a SmolLM2 run keeps ~11 GB of
    fp32 state dicts (21 model versions)."""

    def __init__(self, interval: float = 60.0, prune: list[Path] | None = None):
        super().__init__(daemon=True)
        self.interval, self.samples, self._done = interval, [], threading.Event()
        self.prune = list(prune or [])

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self.prune_finished()
            self._done.wait(self.interval)

    def prune_finished(self, sweep_ended: bool = False) -> None:
        """A seed's job has ended when its ``run_timing.json`` exists and either the sweep has ended
        (``sweep_ended``) or a later seed's folder changed after that file was written (the multirun
        runs the seeds one after another, and a job starts by writing into its folder).
        ``run_timing.json`` alone is not enough: the job still exports its models after writing it,
        and reads the weights to do so (a prune then made that export fail)."""
        for i, run_dir in enumerate(self.prune):
            timing = run_dir / "run_timing.json"
            if not timing.exists():
                continue
            written = timing.stat().st_mtime
            if sweep_ended or any(later.exists() and later.stat().st_mtime >= written for later in self.prune[i + 1:]):
                delete_weights(run_dir)

    def stop(self) -> list:
        self._done.set()
        self.join()
        return self.samples


def delete_weights(run_dir: Path) -> None:
    """Delete a finished run's checkpoints (.pt: written before 2026-12), keeping every score."""
    for suffix in ("*.safetensors", "*.pt"):
        for weights in (run_dir / "phases").glob(suffix):
            weights.unlink()


def run_order(seeds: list[int], runs_dir: Path) -> tuple[list[int], list[int]]:
    """(stopped, fresh): the seeds stopped part-way (their ``phases`` folder holds something) run
    first, with ``run.resume=true``; then the fresh ones, without it."""
    stopped = [s for s in seeds if (runs_dir / f"seed{s}" / "phases").is_dir()
               and any((runs_dir / f"seed{s}" / "phases").iterdir())]
    return stopped, [s for s in seeds if s not in stopped]


def run_seeds(seeds: list[int], runs_dir: Path, preset: str, overrides: list[str], log_path: Path) -> None:
    """The seeds as Hydra multiruns: the stopped ones first with ``run.resume=true`` (they continue
    from their last phase), then the fresh ones without it (a resume of a folder that holds no run
    is refused, so one multirun cannot do both)."""
    stopped, fresh = run_order(seeds, runs_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for group, resume in ((stopped, "true"), (fresh, "false")):
        if not group:
            continue
        command = [sys.executable, str(ROOT / "jobs" / "apo.py"), "-m", f"experiment={preset}",
                   f"run.seed={','.join(map(str, group))}", "run.in_process=true", f"run.resume={resume}",
                   f"hydra.sweep.dir={runs_dir}", "hydra.sweep.subdir=seed${run.seed}", *overrides]
        print("running:", " ".join(command), f"(log: {log_path})", flush=True)
        with open(log_path, "a") as log:
            subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def read_json(path: Path) -> dict | list:
    """A seed's JSON file; a damaged one ends the script with a line naming it and what to do."""
    from apo_ray.outputs.claims import read_json_file

    try:
        return read_json_file(path)
    except ValueError as exc:  # names the file, line and column
        raise SystemExit(f"{exc}; delete that seed's folder to run it again, or leave the seed out of --seeds") from None


def phase_seconds(run_dir: Path) -> dict:
    """Seconds per kind of phase over the whole run (set-up phases counted once)."""
    from apo_ray.outputs.report import wall_time_table

    records = read_json(run_dir / "summary.json")
    phases, rows = wall_time_table(records)
    return {p: round(sum(float(r.get(p) or 0.0) for r in rows), 1) for p in phases if not p.endswith("_total")}


# Which benchmark ratio scales which phase: sampling phases by the sampling benchmark, the rest
# (learners, scoring, evaluation, which is mostly scoring) by the RM learner benchmark.
SAMPLING_PHASES = ("sample_gold", "sample_queries")


def other_cpu_estimate(per_seed: list[dict], here_path: Path, other_path: Path) -> dict | None:
    """Seconds a seed would take on the CPU of ``other_path`` (e.g. the AVX2-only machine's
    ``cpu_demo_choices.json``): each phase's measured seconds here times the ratio of the two
    machines' seconds on the same benchmark (shared-prefill sampling; top-4-blocks RM learner).
    Contention that slowed this machine's phases and benchmark alike cancels in the ratio. An estimate."""
    if not (here_path.exists() and other_path.exists()):
        return None
    here, other = json.loads(here_path.read_text()), json.loads(other_path.read_text())

    def seconds(bench: dict, part: str, key: str, match: str, value: str) -> float:
        return next(float(r[value]) for r in bench[part] if str(r[key]) == match)

    layers = str(here["args"]["trainable_layers"])
    ratio_sampling = (seconds(other, "sampling", "path", "shared prefill", "seconds")
                      / seconds(here, "sampling", "path", "shared prefill", "seconds"))
    ratio_learner = (seconds(other, "rm_learner", "trainable_layers", layers, "train_s")
                     / seconds(here, "rm_learner", "trainable_layers", layers, "train_s"))
    rows = []
    for seed in per_seed:
        phases = seed["phase_seconds"]
        estimate = sum(v * (ratio_sampling if k in SAMPLING_PHASES else ratio_learner) for k, v in phases.items())
        measured = sum(phases.values())
        rows.append({"seed": seed["seed"], "phases_measured_s": measured, "phases_estimated_s": estimate})
    return {"reference": str(other_path), "here": str(here_path), "ratio_sampling": ratio_sampling,
            "ratio_learner": ratio_learner, "other_matmul": other.get("matmul"), "here_matmul": here.get("matmul"),
            "per_seed": rows}


def seed_list(text: str) -> list[int]:
    """``--seeds``: distinct non-negative integers, comma separated (``0,1,2``, ``$(seq -s, 0 39)``)."""
    seeds = []
    for item in text.split(","):
        if not item.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{item.strip()!r} in {text!r} is not a non-negative integer "
                                             "(give run.seed values comma separated, e.g. 0,1,2)")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def preset_name(name: str) -> str:
    """``--preset``: a file of conf/experiment/ (checked before any seed starts)."""
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    if name not in presets:
        raise argparse.ArgumentTypeError(f"no preset {name!r} in conf/experiment/ (there are: {', '.join(presets)})")
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=seed_list, default="0,1,2", help="run.seed values (comma separated)")
    ap.add_argument("--preset", type=preset_name, default="hh_small", help="experiment= preset")
    ap.add_argument("--runs-dir", default=str(ROOT / "outputs" / "science"), help="where the runs go")
    ap.add_argument("--out", default=str(ROOT / "docs" / "science"), help="where the report goes")
    ap.add_argument("--report-only", action="store_true", help="do not run; report on the runs in --runs-dir")
    ap.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples")
    ap.add_argument("--claims", choices=("all", "rm"), default=None,
                    help="the report's family of claims (Holm adjusts over it): all, or the RM claims only "
                         "(the default for the rm_claims presets)")
    ap.add_argument("--keep-weights", action="store_true",
                    help="keep each finished seed's weight files (default: deleted; a finished run then "
                         "cannot be resumed for more rounds)")
    ap.add_argument("--notes", default=None, help="a markdown file appended to the report (e.g. the reading of it)")
    ap.add_argument("--here-bench", default=str(ROOT / "benchmarks" / "results" / "cpu_demo_choices_avx512bf16.json"),
                    help="cpu_demo_choices.py run on this machine")
    ap.add_argument("--other-bench", default=str(ROOT / "benchmarks" / "results" / "cpu_demo_choices.json"),
                    help="cpu_demo_choices.py run on the CPU to estimate for (default: the AVX2-only machine)")
    ap.add_argument("overrides", nargs="*", help="after --: Hydra overrides for every run")
    args = ap.parse_args()

    seeds = args.seeds
    family = args.claims or ("rm" if args.preset.startswith("rm_claims") else "all")
    runs_dir, out = Path(args.runs_dir).resolve(), Path(args.out).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    machine_path = runs_dir / "machine.json"
    machine = read_json(machine_path) if machine_path.exists() else {}
    # A seed that finished keeps its measured timing: only the others run (a stopped seed resumes).
    to_run = [s for s in seeds if not (runs_dir / f"seed{s}" / "run_timing.json").exists()]
    if not args.report_only and to_run:
        resuming, fresh = run_order(to_run, runs_dir)
        if not args.keep_weights:  # seeds an earlier, killed sweep finished
            for seed in set(seeds) - set(to_run):
                delete_weights(runs_dir / f"seed{seed}")
        sampler = LoadSampler(prune=[] if args.keep_weights else [runs_dir / f"seed{s}" for s in resuming + fresh])
        sampler.start()
        start = time.time()
        try:
            run_seeds(to_run, runs_dir, args.preset, args.overrides, runs_dir / "runs.log")
        except subprocess.CalledProcessError as exc:
            how = f"signal {-exc.returncode}" if exc.returncode < 0 else f"exit code {exc.returncode}"
            stopped = SystemExit(f"the sweep stopped ({how}; its log: {runs_dir / 'runs.log'}). Finished seeds "
                                 "are kept and a stopped seed resumes from its last finished phase: run the same "
                                 "command again, or report on the finished seeds with --report-only --seeds ...")
            raise stopped from None
        finally:
            loads = sampler.stop()
            sampler.prune_finished(sweep_ended=True)
            machine.setdefault("sweeps", []).append({
                "seeds": to_run, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
                "wall_seconds": time.time() - start, "overrides": args.overrides,
                "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ},
                "load_average_1min": {"mean": sum(x for _, x in loads) / max(len(loads), 1),
                                      "max": max((x for _, x in loads), default=None), "samples": len(loads)}})
            machine_path.write_text(json.dumps(machine, indent=1))

    import torch

    from apo_ray.outputs.claims import write_claims_report

    run_dirs = [runs_dir / f"seed{s}" for s in seeds]
    missing = [str(d) for d in run_dirs if not (d / "summary.json").exists()]
    if missing:
        raise SystemExit(f"no finished run in {', '.join(missing)}; run without --report-only first")
    per_seed = []
    for seed, run_dir in zip(seeds, run_dirs):
        timing_path = run_dir / "run_timing.json"
        timing = read_json(timing_path) if timing_path.exists() else {}
        per_seed.append({"seed": seed, "dir": str(run_dir), "wall_seconds": timing.get("wall_seconds"),
                         "cpu_seconds": timing.get("process_cpu_seconds"), "phase_seconds": phase_seconds(run_dir)})
    machine |= {"cpu": cpu_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(), "per_seed": per_seed}
    estimate = other_cpu_estimate(per_seed, Path(args.here_bench), Path(args.other_bench))
    if estimate:
        machine["other_cpu_estimate"] = estimate
    sweeps = machine.get("sweeps", [])
    preset = "" if args.preset == "hh_small" else f" --preset {args.preset}"
    notes = [f"Command: `python benchmarks/science.py{preset} --seeds {','.join(map(str, seeds))}`"
             + (f" `-- {' '.join(args.overrides)}`" if args.overrides else "")
             + f" (Hydra multirun of `experiment={args.preset}` over `run.seed`, in process).",
             (f"CPU: {machine['cpu']['model']}, {machine['cpu']['cores']} cores, flags "
             f"{', '.join(machine['cpu']['flags']) or 'none of ' + ', '.join(FLAGS)}; torch {machine['torch']}."),
             *[f"Sweep of seeds {s['seeds']} started {s['started']}: {s['wall_seconds'] / 60:.1f} min wall; "
               f"1-min load average while it ran: mean {s['load_average_1min']['mean']:.1f}, "
               f"max {s['load_average_1min']['max'] or float('nan'):.1f} (a quiet 2-core machine reads about 2)." for s in sweeps]]
    if estimate:
        minutes = [r["phases_estimated_s"] / 60 for r in estimate["per_seed"]]
        notes.append(f"On the 2-core AVX2-only CPU of `{Path(args.other_bench).name}` (fp32 there) a seed would take "
                     f"about {statistics.median(minutes):.0f} min of phases (median over seeds; range "
                     f"{min(minutes):.0f}-{max(minutes):.0f}: a seed that ran beside other work, was paused or filled "
                     f"the shared frozen-block cache first is slower): an estimate, each phase's seconds here times "
                     f"the two machines' ratio on the same benchmark (sampling x{estimate['ratio_sampling']:.2f}, "
                     f"learner x{estimate['ratio_learner']:.2f}; `{Path(args.here_bench).name}` run on this machine).")
    extra = [Path(args.notes).read_text()] if args.notes else []
    report = write_claims_report(run_dirs, out, title=f"APO's claims at small scale (`experiment={args.preset}`)",
                                 notes=notes, machine=machine, n_resamples=args.resamples, sections=extra,
                                 kinds=("rm",) if family == "rm" else None)
    print(f"wrote {report}")
    for row in json.loads((out / "claims.json").read_text())["claims"]:
        print(f"{row['verdict']:>12}  {row['text']}")


if __name__ == "__main__":
    main()
