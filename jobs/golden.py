"""Collect golden answers for exactly the golden queries an experiment will use (resumable).

    OPENAI_API_KEY=... python jobs/golden.py --out golden.jsonl --base-url https://api.openai.com/v1 \
        --model gpt-4o --concurrency 8 -- experiment=paper_hh data.seed=0

Everything after the options is a Hydra override list, the same one `jobs/apo.py` is given: the
config is composed from the same presets and the queries come from the same loader, split and seed
as the game's (`apo_ray.data.load_apo_splits` + `golden_query_pairs`), so a run with
`data.golden_path=<out>` finds an answer for every golden query. Rerunning with the same ``--out``
asks only the queries not yet answered in the file (failed requests are not written, so they are
asked again). Prints the counts by source (model / model+why / canned-refusal / chosen-fallback)
and of failures as JSON; exits non-zero when more than ``--max-failed-fraction`` of the queries
asked failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python jobs/golden.py` from anywhere

from apo_ray.config import compose
from apo_ray.data import golden_query_pairs, load_apo_splits, resolve_paths
from apo_ray.llm_api.golden import collect_golden_answers, mostly_failed
from apo_ray.llm_api.judge import ChatAPI, add_endpoint_arguments


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="golden answers .jsonl (appended to; resumes)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N golden queries (the rest fall back to the chosen response)")
    add_endpoint_arguments(parser)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="picks the canned refusal per query")
    parser.add_argument("--cache", default=None, help="optional JSONL answer cache")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, as given to jobs/apo.py (e.g. experiment=demo data.path=...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = resolve_paths(compose(args.overrides, config_dir=str(ROOT / "conf")), os.getcwd())
    queries = golden_query_pairs(load_apo_splits(cfg.data), cfg.data.gold_queries)
    api = ChatAPI(args.base_url, args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                  max_retries=args.max_retries, cache_path=args.cache, temperature=args.temperature,
                  max_tokens=args.max_tokens)
    summary = collect_golden_answers(queries, args.out, api, limit=args.limit, seed=args.seed)
    summary["golden_queries"] = len(queries)
    summary["overrides"] = list(args.overrides)
    print(json.dumps(summary, indent=2))
    if mostly_failed(summary, args.max_failed_fraction):
        raise SystemExit(f"golden answers: {summary['failed']} of {summary['asked']} queries failed after retries "
                         f"({summary['failed_by_error']}); check --base-url, --model and the key in "
                         f"${args.api_key_env}. Those queries were not written; rerun to ask them again")
    print(f"use it: python jobs/apo.py {' '.join(args.overrides)} data.golden_path={Path(args.out).resolve()}",
          file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
