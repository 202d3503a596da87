"""Serve a model with an OpenAI-compatible API on Ray Serve, and block until Ctrl-C.

    python jobs/serve.py --model smollm2-135m-instruct --port 8000
    ray job submit --working-dir . -- python jobs/serve.py --model /path/to/policy --host 0.0.0.0

Where vLLM is installed this is Ray's OpenAI app on vLLM (``ray.serve.llm``: chat, streaming,
completions); elsewhere our own chat server on transformers. Then use any OpenAI client with
``base_url=http://HOST:PORT/v1``. Set ``$APO_SERVE_API_KEY`` to require ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/serve.py` from anywhere

from apo_ray.llm_api.server import (
    BACKENDS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_ONGOING_REQUESTS,
    start_server,
    stop_server,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: vllm where installed")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--app-name", default="apo-chat", help="the Serve application (deleted on Ctrl-C)")
    parser.add_argument("--route-prefix", default="/")
    parser.add_argument("--num-replicas", type=int, default=1)
    parser.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where bf16 matmuls are fast, else float32")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="vllm: prompt + answer tokens (default: the model's context length)")
    parser.add_argument("--max-new-tokens-cap", type=int, default=512, help="transformers: cap on max_tokens")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="a request body not complete by then is dropped with 408 (stalled uploads)")
    parser.add_argument("--max-ongoing-requests", type=int, default=DEFAULT_MAX_ONGOING_REQUESTS,
                        help="transformers: requests one replica holds at once (generation is one at a time)")
    parser.add_argument("--engine-kwargs", type=json.loads, default=None, help='vllm: JSON, e.g. \'{"seed": 1}\'')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    served = start_server(args.model, backend=args.backend, port=args.port, host=args.host, app_name=args.app_name,
                          route_prefix=args.route_prefix, num_replicas=args.num_replicas,
                          num_cpus_per_replica=args.num_cpus_per_replica,
                          num_gpus_per_replica=args.num_gpus_per_replica, dtype=args.dtype,
                          max_model_len=args.max_model_len, max_new_tokens_cap=args.max_new_tokens_cap,
                          max_body_bytes=args.max_body_bytes, engine_kwargs=args.engine_kwargs,
                          body_timeout_s=args.body_timeout_s, max_ongoing_requests=args.max_ongoing_requests)
    print(f"serving {args.model} at {served.base_url} ({served.backend}; Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_server(served.app_name)


if __name__ == "__main__":
    main()
