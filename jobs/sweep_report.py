"""Write one report comparing the runs of a sweep (Hydra multirun folder or jobs/sweep.py's output root).

    python jobs/sweep_report.py multirun/smoke/2026-11-25_10-00-00    # -> sweep_report.md beside the runs

Hydra multiruns of jobs/apo.py and `jobs/sweep.py --wait` write it themselves; this is for the rest
(e.g. a sweep submitted without --wait, once its jobs are done).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/sweep_report.py` from anywhere

from apo_ray.outputs.sweep_report import write_sweep_report


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="folder holding the sweep's runs (each with summary.json)")
    args = parser.parse_args(argv)
    try:
        path = write_sweep_report(Path(args.sweep_dir))
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    print(path)
    return path


if __name__ == "__main__":
    main()
