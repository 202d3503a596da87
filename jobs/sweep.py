"""Send each point of a grid to a Ray cluster as its own job (Hydra multirun runs them one after
another in one process; this runs them side by side, each visible in the dashboard's Jobs tab).

    python jobs/sweep.py --address http://127.0.0.1:8265 --output-root /shared/sweeps/beta2 \
        apo.beta2=1,10,100 rm.lr=1e-8,1e-7 -- experiment=paper_hh

Arguments before ``--`` are swept, in Hydra's sweep syntax (``a,b,c``, ``range(1,4)``,
``choice(...)``, quoting and lists as in ``python jobs/apo.py -m``; parsed by Hydra's own override
parser): every point of their cartesian product is one job. Those after ``--`` are passed to every job
unchanged. With ``--wait`` it waits for the jobs and writes ``sweep_report.md`` into the output root
(else run ``python jobs/sweep_report.py OUTPUT_ROOT`` once they are done).
"""

import argparse
import itertools
import json
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def grid(swept: list[str]) -> list[list[str]]:
    """The points of the sweep: one list of ``key=value`` overrides per point, in Hydra's order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(swept)
    except HydraException as err:
        raise SystemExit(f"sweep: {err}") from None
    axes = []
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes.append([f"{key}={override.get_value_element_as_str()}"])
        elif override.is_discrete_sweep():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            raise SystemExit(f"sweep: {key}: only discrete sweeps (a,b,c / range / choice) make a grid")
    return [list(point) for point in itertools.product(*axes)]


# gitignore patterns: a leading "/" anchors one to the working dir's root, so the run folders at the
# top are left out and the package's own apo_ray/outputs/ is not ("outputs/" alone matches both).
WORKING_DIR_EXCLUDES = ["/outputs/", "/multirun/", "/.git/", "/.gpu-bundle/"]


def entrypoint(fixed: list[str], point: list[str], output_dir: Path) -> str:
    """The job's shell command. Quoted: Ray runs it through a shell, and a value may hold spaces,
    quotes or ``&`` (an ``hf://...?data_dir=x&split=y`` data path)."""
    return shlex.join(["python", "jobs/apo.py", *fixed, *point, f"run.output_dir={output_dir}"])


def slug(point: list[str]) -> str:
    # No "=" in the folder name: it goes back into a Hydra override (run.output_dir=...).
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ",".join(point)) or "default"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fixed = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="Ray dashboard address (default: $RAY_ADDRESS)")
    parser.add_argument("--output-root", required=True, help="absolute folder; each point writes into a subfolder")
    parser.add_argument("--wait", action="store_true", help="wait for every job and exit non-zero if one failed")
    parser.add_argument("--timeout-s", type=float, default=24 * 3600)
    parser.add_argument("swept", nargs="*", help="key=v1,v2,... (Hydra sweep syntax)")
    args = parser.parse_args(argv)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    root = Path(args.output_root).resolve()
    jobs = {}
    for point in grid(args.swept):
        out = root / slug(point)
        job_id = client.submit_job(
            entrypoint=entrypoint(fixed, point, out),
            runtime_env={"working_dir": str(ROOT), "excludes": WORKING_DIR_EXCLUDES},
            metadata={"apo_sweep": str(root), "point": ",".join(point)},
        )
        jobs[job_id] = {"point": point, "output_dir": str(out)}
        print(f"submitted {job_id}: {' '.join(point)} -> {out}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(jobs, indent=2))
    if not args.wait:
        return 0
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.time() + args.timeout_s
    status = {}
    while time.time() < deadline:
        status = {job_id: client.get_job_status(job_id) for job_id in jobs}
        if all(s in done for s in status.values()):
            break
        time.sleep(2)
    failed = 0
    for job_id, info in jobs.items():
        print(f"{job_id}\t{status.get(job_id)}\t{' '.join(info['point'])}")
        failed += status.get(job_id) != JobStatus.SUCCEEDED
    if failed < len(jobs):
        from apo_ray.outputs.sweep_report import write_sweep_report

        print(f"sweep report: {write_sweep_report(root)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
