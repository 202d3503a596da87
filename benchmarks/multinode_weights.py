"""Weight exchange within a node and across nodes: GB/s of a learner's packed weights reaching a
pool actor on the same node and on another node, on a real two-node Ray cluster of this machine
(tests/ray_nodes.py: a head and a worker node from `ray start`, each its own raylet and object store).

A sender actor on the head puts a fresh packed state dict of a real model shape in its node's object
store (``apo_ray.weights.put_weights``, as learner rank 0 does) for every repeat; a receiver actor on
the head and one on the worker node each fetch it (``ray.get``: a mapping of the local store on the
same node, a transfer between the object managers across nodes) and copy every tensor into tensors
of their own (what ``load_packed_into`` does into a generator's model). Seconds are measured inside
the receiver, fetch and copy separately; GB = 1e9 bytes of packed buffer. Median of ``--repeats``
after one warm-up, with min/max spread and the load average around the run.

Across nodes here means across two raylets of one machine over loopback: it measures Ray's object
manager (chunking, copying into the second store), not a network. On a real cluster the network
link bounds it (e.g. ~1.2 GB/s on 10 GbE).

    python benchmarks/multinode_weights.py --repeats 7
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CLIENT = r"""
import json, sys, time
import ray
import torch
from apo_ray.models.weights import put_weights, unpack_state_dict

args = json.loads(sys.argv[2])
ray.init(address=sys.argv[1], logging_level="ERROR")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def state_dict(shape, dtype):
    from transformers import AutoModelForCausalLM
    from apo_ray.models.loading import shape_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape))
    gen, out, seen = torch.Generator().manual_seed(0), {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied embeddings: sent once
            continue
        seen.add(id(t))
        out[name] = torch.empty(t.shape, dtype=DTYPES[dtype]).normal_(0.0, 0.02, generator=gen)
    return out


@ray.remote(num_cpus=0, resources={"apo_head": 1})
class Sender:
    def __init__(self, shape, dtype):
        torch.set_num_threads(1)
        self.sd = state_dict(shape, dtype)

    def fresh(self):
        return [put_weights(self.sd)]  # a new object every call: nothing cached on the receivers' nodes

    def node(self):
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class Receiver:
    def __init__(self, shape, dtype):
        torch.set_num_threads(1)
        self.dst = {k: torch.empty_like(v) for k, v in state_dict(shape, dtype).items()}

    def receive(self, refs):
        t0 = time.perf_counter()
        packed = ray.get(refs[0])
        t1 = time.perf_counter()
        for name, tensor in unpack_state_dict(packed).items():  # read-only views of the fetched buffer
            self.dst[name].copy_(tensor)
        t2 = time.perf_counter()
        return {"fetch_s": t1 - t0, "copy_s": t2 - t1, "bytes": packed.total_bytes}

    def node(self):
        return ray.get_runtime_context().get_node_id()


sender = Sender.remote(args["shape"], args["dtype"])
receivers = {"within_node": Receiver.options(resources={"apo_head": 1}).remote(args["shape"], args["dtype"]),
             "across_nodes": Receiver.options(resources={"apo_worker": 1}).remote(args["shape"], args["dtype"])}
nodes = {k: ray.get(r.node.remote()) for k, r in receivers.items()} | {"sender": ray.get(sender.node.remote())}
assert nodes["within_node"] == nodes["sender"] != nodes["across_nodes"], nodes
runs = {k: [] for k in receivers}
for i in range(args["repeats"] + 1):
    for kind, receiver in receivers.items():  # interleaved: both see the same machine load
        refs = ray.get(sender.fresh.remote())
        result = ray.get(receiver.receive.remote(refs))
        del refs
        if i > 0:  # the first round warms up both receivers
            runs[kind].append(result)
print("RESULT " + json.dumps(runs))
"""


def summarize(runs: list[dict]) -> dict:
    total = [r["fetch_s"] + r["copy_s"] for r in runs]
    gbs = [r["bytes"] / 1e9 / t for r, t in zip(runs, total)]
    fetch_gbs = [r["bytes"] / 1e9 / r["fetch_s"] for r in runs]
    return {"bytes": runs[0]["bytes"], "repeats": len(runs),
            "median_s": statistics.median(total), "min_s": min(total), "max_s": max(total),
            "median_gb_per_s": statistics.median(gbs), "min_gb_per_s": min(gbs), "max_gb_per_s": max(gbs),
            "median_fetch_s": statistics.median(r["fetch_s"] for r in runs),
            "median_fetch_gb_per_s": statistics.median(fetch_gbs),
            "median_copy_s": statistics.median(r["copy_s"] for r in runs), "runs": runs}


def main() -> None:
    from ray_nodes import LocalCluster
    from results_io import write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["smollm2-135m", "qwen2.5-0.5b"], default="smollm2-135m")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multinode_weights_cpu.json"))
    args = p.parse_args()
    if args.repeats < 5:
        p.error("--repeats must be >= 5 (medians over at least 5)")

    load_before = os.getloadavg()
    start = time.time()
    cluster = LocalCluster(head_cpus=1, head_resources={"apo_head": 4}, object_store_bytes=2**30)
    try:
        cluster.add_worker("worker", cpus=1, resources={"apo_worker": 4})
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
            fh.write(CLIENT)
        proc = subprocess.run([sys.executable, fh.name, cluster.gcs, json.dumps(vars(args))], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800, check=False,
                              env=dict(cluster.env, PYTHONPATH=str(ROOT)))
        os.unlink(fh.name)
    finally:
        cluster.shutdown()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the benchmark client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    runs = json.loads(line[len("RESULT "):])
    load_after = os.getloadavg()
    result = {
        "benchmark": "multinode_weights", "shape": args.shape, "dtype": args.dtype,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "wall_s": time.time() - start,
        "layout": "head (sender + within-node receiver) and a worker node (across-nodes receiver), one machine",
        "results": {kind: summarize(r) for kind, r in runs.items()},
    }
    r = result["results"]
    result["across_over_within_time"] = r["across_nodes"]["median_s"] / r["within_node"]["median_s"]
    print(f"{args.shape} {args.dtype}: {r['within_node']['bytes'] / 1e6:.0f} MB packed, "
          f"{args.repeats} repeats, load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'path':<14}{'median GB/s':>12}{'min..max GB/s':>16}{'median s':>10}{'fetch s':>9}{'copy s':>8}")
    for kind, s in r.items():
        print(f"{kind:<14}{s['median_gb_per_s']:>12.2f}{s['min_gb_per_s']:>8.2f}..{s['max_gb_per_s']:<6.2f}"
              f"{s['median_s']:>10.3f}{s['median_fetch_s']:>9.3f}{s['median_copy_s']:>8.3f}")
    print(f"across nodes takes {result['across_over_within_time']:.2f}x the within-node time")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
