"""Send each point of a grid to a Ray cluster as its own job (Hydra multirun runs them one after
another in one process; this runs them side by side, each visible in the dashboard's Jobs tab).

    python jobs/sweep.py --address http://127.0.0.1:8265 --output-root /shared/sweeps/beta2 \
        apo.beta2=1,10,100 rm.lr=1e-8,1e-7 -- experiment=paper_hh

Arguments before ``--`` with commas are swept (their cartesian product); those after are fixed.
"""

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grid(swept: list[str]) -> list[list[str]]:
    axes = []
    for item in swept:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"sweep: expected key=v1,v2,... got {item!r}")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


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
    parser.add_argument("swept", nargs="*", help="key=v1,v2,...")
    args = parser.parse_args(argv)

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    root = Path(args.output_root).resolve()
    jobs = {}
    for point in grid(args.swept):
        out = root / slug(point)
        entrypoint = " ".join(["python", "jobs/apo.py", *fixed, *point, f"run.output_dir={out}"])
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(ROOT), "excludes": ["outputs/", "multirun/", ".git/", ".gpu-bundle/"]},
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
