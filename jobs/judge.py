"""Judge two sets of responses against each other with a pairwise LLM judge (both orders).

    OPENAI_API_KEY=... python jobs/judge.py --ours apo.jsonl --theirs rjs.jsonl --out-dir judge_out \
        --base-url https://api.openai.com/v1 --model gpt-4o

Inputs are JSON lines with "prompt" and "response"; prompts present in both files are compared
(in the order of --ours). Writes ``judgements.jsonl`` (one record per comparison, with both raw
judge answers) and ``summary.json`` (win/tie/loss/inconsistent/invalid counts and rates). Exits
non-zero when more than ``--max-failed-fraction`` of the requests failed after retries (the records
made are still written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/judge.py` from anywhere

from apo_ray.data import query_key
from apo_ray.llm_api.judge import (
    JudgeClient,
    JudgeError,
    add_endpoint_arguments,
    read_json_line,
    summarize_records,
)


def read_responses(path: str) -> dict[str, tuple[str, str]]:
    """query key -> (prompt, response); a later line for the same prompt wins."""
    rows = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            row = read_json_line(raw)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or \
                    not isinstance(row.get("response"), str):
                raise SystemExit(f"{path}:{lineno}: expected a JSON object with string fields 'prompt' and "
                                 f"'response'")
            rows[query_key(row["prompt"])] = (row["prompt"], row["response"])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", required=True)
    parser.add_argument("--theirs", required=True)
    parser.add_argument("--out-dir", required=True)
    add_endpoint_arguments(parser)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cache", default=None, help="JSONL answer cache (default: OUT_DIR/judge_cache.jsonl)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ours, theirs = read_responses(args.ours), read_responses(args.theirs)
    keys = [k for k in ours if k in theirs][: args.limit]
    if not keys:
        raise SystemExit(f"no prompt appears in both {args.ours} and {args.theirs}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = JudgeClient(args.base_url, args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
                        max_retries=args.max_retries, max_tokens=args.max_tokens,
                        cache_path=args.cache or out_dir / "judge_cache.jsonl",
                        max_failed_fraction=args.max_failed_fraction)
    failure = None
    try:
        records = judge.judge_pairs([ours[k][0] for k in keys], [ours[k][1] for k in keys],
                                    [theirs[k][1] for k in keys])
    except JudgeError as err:
        failure, records = err, err.records
    with open(out_dir / "judgements.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if failure is not None:
        raise SystemExit(str(failure))
    summary = {**summarize_records(records), "ours": args.ours, "theirs": args.theirs, "judge_model": args.model,
               "api": dict(judge.api.stats)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
