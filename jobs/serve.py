"""Serve a local HF causal LM with an OpenAI-compatible API on Ray Serve, and block until Ctrl-C.

    python jobs/serve.py --model smollm2-135m-instruct --port 8000
    ray job submit --working-dir . -- python jobs/serve.py --model /path/to/policy --host 0.0.0.0

Then use any OpenAI client with ``base_url=http://HOST:PORT/v1``. Set ``$APO_SERVE_API_KEY`` to
require ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/serve.py` from anywhere

from apo_ray.serve import start_server, stop_server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--route-prefix", default="/")
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--max-new-tokens-cap", type=int, default=512)
    parser.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where bf16 matmuls are fast, else float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    url = start_server(args.model, port=args.port, host=args.host, route_prefix=args.route_prefix,
                       num_replicas=args.num_replicas, max_new_tokens_cap=args.max_new_tokens_cap,
                       num_gpus_per_replica=args.num_gpus_per_replica, dtype=args.dtype)
    print(f"serving {args.model} at {url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_server()


if __name__ == "__main__":
    main()
