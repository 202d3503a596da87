"""On the GPU machine: the DeepSpeed ZeRO-2/3 learner path of apo_ray.models.training in one process (nccl),
RM and policy. Run: bash .gpu-bundle/install.sh && PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0
APO_RAY_CACHE=$PWD/.gpu-cache python benchmarks/deepspeed_check.py (2026-11-22, H100: both stages ran,
finite losses, full 273-tensor state dicts gathered)."""
import os
import sys

import torch
import torch.distributed as dist

if not (torch.cuda.is_available() and dist.is_nccl_available()):
    sys.exit("deepspeed_check.py needs a CUDA GPU and NCCL (it runs ZeRO-2/3 over nccl); none here")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
dist.init_process_group("nccl")
from apo_ray.data import RankedPair, load_preference_pairs
from apo_ray.models.training import TrainSettings, train_policy, train_reward_model

pairs = [RankedPair.from_preference(p) for p in load_preference_pairs(".gpu-cache/hh-rlhf", limit=16)]
for stage in (2, 3):
    s = TrainSettings(lr=1e-5, examples_per_step=8, micro_examples=4, max_length=128, precision="bf16",
                      device="cuda", strategy="deepspeed", zero_stage=stage)
    state, stats = train_reward_model("smollm2-135m-random", None, pairs, s)
    print(f"deepspeed zero-{stage} rm: losses {[round(x, 4) for x in stats['losses']]}, {len(state)} tensors, "
          f"skipped {stats['skipped_steps']}", flush=True)
    state, stats = train_policy("smollm2-135m-random", None, [(p.prompt, p.good) for p in pairs], s)
    print(f"deepspeed zero-{stage} policy: losses {[round(x, 4) for x in stats['losses']]}, {len(state)} tensors", flush=True)
