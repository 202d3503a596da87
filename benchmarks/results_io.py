"""What benchmarks share: write the result dict as JSON and say where; run a script against the
package as it was at an earlier commit, for a before/after in one run; argument types."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def positive_int(text: str) -> int:
    """argparse type of a count (repeats, resamples, prompts, pairs): an integer >= 1, else a usage error
    before anything runs."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def write_result(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def run_at_ref(ref: str, script: str | Path, script_args: list[str]) -> dict:
    """Run ``script`` with ``script_args --out <json>`` in a temporary git worktree of ``ref``, with
    that tree's package on ``PYTHONPATH``, and return the JSON it wrote. A relative ``script`` is the
    one in the old tree (the benchmark as it was); an absolute one is today's script (the same
    measurement of the old package)."""
    tmp = Path(tempfile.mkdtemp(prefix="apo-bench-base-"))
    tree, out = tmp / "tree", tmp / "baseline.json"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    try:
        path = script if Path(script).is_absolute() else tree / script
        subprocess.run([sys.executable, str(path), *script_args, "--out", str(out)], cwd=tree, check=True,
                       env=dict(os.environ, PYTHONPATH=str(tree)))
        return json.loads(out.read_text())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
