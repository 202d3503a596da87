"""Write Hugging Face folders for the model versions of a finished or stopped run.

    python jobs/export.py /shared/runs/apo1                  # every version in phases/ -> models/
    python jobs/export.py /shared/runs/apo1 --versions 'policy/*' --out /tmp/policies

Reads the run's ``resolved_config.json`` (base models, decoding settings) and its checkpoints in
``phases/`` (each the tensors its phase trained, over its base's: ``apo_ray.game.store.load_checkpoint``); a run
started with ``run.save_models=none`` or stopped mid-way exports the same way. Folders that exist are
kept unless ``--overwrite``. Shows a progress bar; prints ``{version: folder}`` as JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/export.py` from anywhere


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run's output_dir (holds resolved_config.json and phases/)")
    parser.add_argument("--out", default=None, help="folder for the exports (default: RUN_DIR/models)")
    parser.add_argument("--versions", nargs="*", default=["*"], help="glob(s) over version ids, e.g. 'rm/*'")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from omegaconf import OmegaConf
    from tqdm import tqdm

    from apo_ray.config import from_omegaconf
    from apo_ray.game.store import PhaseStore, load_checkpoint
    from apo_ray.outputs.export import (
        export_folder,
        export_version,
        select_versions,
        version_kind,
        write_index,
    )
    from apo_ray.outputs.observer import policy_generation_config

    run = Path(args.run_dir)
    config_path = run / "resolved_config.json"
    if not config_path.exists():
        raise SystemExit(f"{config_path} not found: is {run} the output_dir of an apo_ray run?")
    cfg = from_omegaconf(OmegaConf.create(json.loads(config_path.read_text())))
    if not (run / "phases").is_dir():
        raise SystemExit(f"{run / 'phases'} not found: the run stored no phases")
    store = PhaseStore(run / "phases", system=None)
    versions = [v for v in store.weights_keys() if any(fnmatch.fnmatchcase(v, g) for g in args.versions)]
    if not versions:
        raise SystemExit(f"no stored model version in {run / 'phases'} matches {args.versions}")
    summary = run / "summary.json"
    meta = dict(select_versions(json.loads(summary.read_text()), "all", cfg.apo.rounds)) if summary.exists() else {}
    models = Path(args.out) if args.out else run / "models"
    base = {"policy": cfg.model.policy, "rm": cfg.model.reward}
    generation = policy_generation_config(cfg)
    done = {}
    for version in tqdm(versions, desc="export", unit="model"):
        state = load_checkpoint(store.version_path(version))
        folder = export_version(version, state, export_folder(models, version), base_model=base[version_kind(version)],
                                generation=generation, meta=meta.get(version, {}), overwrite=args.overwrite,
                                merged=cfg.run.export_merged)
        done[version] = str(folder)
    write_index(models, {v: meta.get(v, {}) | {"folder": f} for v, f in done.items()})
    print(json.dumps(done, indent=2))
    return done


if __name__ == "__main__":
    main()
