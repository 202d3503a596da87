"""Collect golden answers for RM queries from an OpenAI-compatible endpoint (resumable).

    OPENAI_API_KEY=... python jobs/golden.py --data ../shared/data/hh-rlhf --out golden.jsonl \
        --limit 1000 --base-url https://api.openai.com/v1 --model gpt-4o --concurrency 8

Rerunning with the same ``--out`` asks only the queries not yet answered in the file (failed
requests are not written, so they are asked again). Prints the counts by source (model / model+why
/ canned-refusal / chosen-fallback) and of failures as JSON; exits non-zero when more than
``--max-failed-fraction`` of the queries asked failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/golden.py` from anywhere

from apo_ray.data import load_preference_pairs
from apo_ray.golden import collect_golden_answers, mostly_failed
from apo_ray.judge import ChatAPI, add_endpoint_arguments


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="preference pairs: .jsonl(.gz), folder or hf:// spec")
    parser.add_argument("--out", required=True, help="golden answers .jsonl (appended to; resumes)")
    parser.add_argument("--limit", type=int, default=None, help="first N distinct queries")
    add_endpoint_arguments(parser)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="picks the canned refusal per query")
    parser.add_argument("--cache", default=None, help="optional JSONL answer cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # limit counts pairs here; repeated prompts make the distinct queries at most that many
    pairs = load_preference_pairs(args.data, limit=args.limit)
    api = ChatAPI(args.base_url, args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                  max_retries=args.max_retries, cache_path=args.cache, temperature=args.temperature,
                  max_tokens=args.max_tokens)
    summary = collect_golden_answers(pairs, args.out, api, limit=args.limit, seed=args.seed)
    print(json.dumps(summary, indent=2))
    if mostly_failed(summary, args.max_failed_fraction):
        raise SystemExit(f"golden answers: {summary['failed']} of {summary['asked']} queries failed after retries "
                         f"({summary['failed_by_error']}); check --base-url, --model and the key in "
                         f"${args.api_key_env}. Those queries were not written; rerun to ask them again")
    return summary


if __name__ == "__main__":
    main()
