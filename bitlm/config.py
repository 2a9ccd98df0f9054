"""One config schema for every entrypoint: typed dataclasses, loaded from YAML or dicts.

``ExperimentConfig`` holds the sections; the CLI, Ray Train, Tune search spaces and Serve all
read the same object. Unknown keys are refused with a message naming them, values are checked
against the field types, and ``to_dict`` / ``from_dict`` round-trip exactly.

Overrides use dotted keys with YAML values: ``apply_overrides(cfg, ["model.d_model=256",
"train.lr=1e-3"])``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not fit the schema (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    """Architecture of a BitTransformerLM; the user guide's constructor arguments."""

    d_model: int = 128
    nhead: int = 8
    num_layers: int = 4
    dim_feedforward: int = 512
    max_seq_len: int = 1024
    # On the embeddings and every block's residual branches. None: the architecture's default
    # (ARCH_DEFAULTS: the guide's 0.1 for "bit"; 0 for "byte_patch", where it cost 20% of the
    # step's time and no held-out bits/byte measured at the budgets it trains in).
    dropout: float | None = None
    # On the attention probabilities. Off by default: any value > 0 takes PyTorch's fused
    # attention (flash) kernels off the table for the math path, which materializes (B, H, T, T)
    # probabilities and a mask as large, and doubled the CPU step of byte_patch (issue 16).
    attn_dropout: float = 0.0
    # byte_patch: each patch's input also sums hashed embeddings of the byte n-grams of these
    # sizes ending at each of its bytes (BLT's hash n-gram embeddings), ngram_vocab rows per
    # size. None: the architecture's default (ARCH_DEFAULTS).
    ngram_sizes: list[int] | None = None
    ngram_vocab: int = 8192
    # While training, each n-gram row a byte reads is left out with this probability (the rest
    # scaled up): the tables memorize a small corpus otherwise. None: the architecture's default.
    ngram_dropout: float | None = None
    chunk_size: int | None = None  # local attention window (positions); None = full causal
    reversible: bool = False
    use_checkpoint: bool = False
    lambda_K: float = 0.0
    lambda_C: float = 0.0
    lambda_S: float = 0.0
    full_attn_logging: bool = False
    use_autocast: bool = False
    bit_embedding: str = "prefix"  # arch "bit": "prefix" (byte-aware) or "plain" (bit only)
    arch: str = "bit"  # "bit": one position per bit; "byte_patch": one per patch of bytes
    # Bytes per global position (byte_patch). None: the architecture's default (ARCH_DEFAULTS).
    patch_bytes: int | None = None
    local_decoder: str = "softmax"  # byte_patch: "softmax" (bit conditionals of a byte softmax) or "tree"
    # A learned vector added to every input position in diffusion mode (causal=False), so that
    # one model trained in both modes knows which task a window is (bitlm.diffusion).
    mode_embedding: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.nhead:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        for name in ("d_model", "nhead", "num_layers", "dim_feedforward", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.attn_dropout < 1.0:
            raise ConfigError(f"model.attn_dropout must be in [0, 1), got {self.attn_dropout}")
        sizes = self.ngram_sizes or []
        if any(not 2 <= n <= 8 for n in sizes) or len(set(sizes)) < len(sizes):
            raise ConfigError(f"model.ngram_sizes must be distinct sizes from 2 to 8, got {self.ngram_sizes}")
        if sizes and self.arch != "byte_patch":
            raise ConfigError("model.ngram_sizes needs arch=byte_patch: the bit model embeds bits, not bytes")
        if self.ngram_vocab < 1:
            raise ConfigError(f"model.ngram_vocab must be >= 1, got {self.ngram_vocab}")
        if self.ngram_dropout is not None and not 0.0 <= self.ngram_dropout < 1.0:
            raise ConfigError(f"model.ngram_dropout must be in [0, 1), got {self.ngram_dropout}")
        if self.ngram_dropout and self.ngram_sizes == []:
            raise ConfigError("model.ngram_dropout needs n-grams: model.ngram_sizes is empty")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"model.chunk_size must be >= 1 or null, got {self.chunk_size}")
        if self.arch not in ("bit", "byte_patch"):
            raise ConfigError(f"model.arch must be 'bit' or 'byte_patch', got {self.arch!r}")
        if self.bit_embedding not in ("prefix", "plain"):
            raise ConfigError(f"model.bit_embedding must be 'prefix' or 'plain', got {self.bit_embedding!r}")
        if self.local_decoder not in ("softmax", "tree"):
            raise ConfigError(f"model.local_decoder must be 'softmax' or 'tree', got {self.local_decoder!r}")
        if self.patch_bytes is not None and self.patch_bytes < 1:
            raise ConfigError(f"model.patch_bytes must be >= 1, got {self.patch_bytes}")
        if self.patch_bytes not in (None, 1) and self.arch != "byte_patch":
            raise ConfigError("model.patch_bytes needs arch=byte_patch: the bit model has one position per bit")
        if self.reversible and self.use_checkpoint:
            # Reversible blocks already recompute activations; checkpointing them again only
            # adds a third forward pass.
            self.use_checkpoint = False

    def resolved(self) -> ModelConfig:
        """This config with every setting left to the architecture (None) set from
        ARCH_DEFAULTS: what a model is built from and what its checkpoint records. (Kept None
        until then, so that an override of ``model.arch`` brings that architecture's defaults.)"""
        left = {k: v for k, v in ARCH_DEFAULTS[self.arch].items() if getattr(self, k) is None}
        if "ngram_dropout" in left and not (self.ngram_sizes if self.ngram_sizes is not None else left["ngram_sizes"]):
            left["ngram_dropout"] = 0.0  # no n-grams to drop
        return dataclasses.replace(self, **left)


# The settings that depend on the architecture, where a config leaves them None. byte_patch's
# are what benchmarks/quality.py measured best at equal time (README, "Bits at byte-level cost").
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "bit": {"dropout": 0.1, "ngram_sizes": [], "ngram_dropout": 0.0, "patch_bytes": 1},
    "byte_patch": {"dropout": 0.0, "ngram_sizes": [2, 3, 4], "ngram_dropout": 0.5, "patch_bytes": 4},
}


@dataclass
class TrainConfig:
    """Optimization and loop settings shared by train_loop and the Ray Train workers."""

    lr: float = 1e-3
    min_lr: float = 1e-4  # floor of the cosine schedule
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # "cosine" | "constant"
    batch_size: int = 8
    accum_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_seconds: float | None = None
    grad_clip: float = 1.0
    amp: bool = False  # bf16 autocast, on CPU and CUDA alike
    compile_model: bool = False
    fused_adamw: bool = False  # AdamW's fused kernel (CPU and CUDA): one launch per step, not per tensor
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    # objectives and curricula (see bitlm.objectives and bitlm.schedules)
    compress_prob: float = 0.0
    compress_warmup: int = 0
    direct_prob: float = 0.0
    diffusion: bool = False
    diffusion_prob: float = 0.5  # with diffusion: the share of micro-batches trained to denoise
    diffusion_curriculum: bool = False
    diffusion_steps: int = 8
    noise_schedule: str = "linear"
    seq_ramp_start_bytes: int | None = None
    seq_ramp_steps: int = 0
    # progressive scaling inside train_loop (off unless scale_patience is set)
    scale_patience: int | None = None
    scale_min_delta: float = 0.0
    scale_strategies: list[str] = field(default_factory=lambda: ["depth", "width", "context"])
    scale_max_params: int | None = None
    growth_warmup_steps: int = 10  # after any growth, the lr ramps up again over this many steps

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        for name in ("batch_size", "accum_steps", "epochs", "diffusion_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.noise_schedule not in ("linear", "cosine", "exp"):
            raise ConfigError(f"train.noise_schedule must be linear, cosine or exp, got {self.noise_schedule!r}")
        for name in ("compress_prob", "direct_prob", "diffusion_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        check_strategies("train.scale_strategies", self.scale_strategies)


def check_strategies(key: str, strategies) -> None:
    """Growth strategies (bitlm.scale.expand_model's) or a ConfigError naming ``key``."""
    bad = [x for x in strategies if x not in ("depth", "width", "context")]
    if bad:
        raise ConfigError(f"{key}: unknown strategy {bad[0]!r} (depth, width, context)")


@dataclass
class DataConfig:
    """Corpus and windowing. No inputs means the built-in corpus (pydoc_data.topics)."""

    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"  # JSON Lines field / parquet column holding the text
    window_bytes: int = 64  # bytes per training window (9 bits each)
    stride_bytes: int | None = None  # None = window_bytes (no overlap)
    chunk_bytes: int = 1 << 20  # longer documents are cut into pieces this long that split apart
    val_fraction: float = 0.1
    seed: int = 0
    output_dir: str = "data/prepared"
    shard_rows: int = 4096
    shuffle_windows: int = 8192  # training windows shuffled together (packed, ~9/8 KB each); 0: in order

    def __post_init__(self) -> None:
        if self.shuffle_windows < 0:
            raise ConfigError(f"data.shuffle_windows must be >= 0, got {self.shuffle_windows}")
        if self.window_bytes < 2:
            raise ConfigError(f"data.window_bytes must be >= 2, got {self.window_bytes}")
        if self.chunk_bytes < self.window_bytes:
            raise ConfigError(
                f"data.chunk_bytes ({self.chunk_bytes}) must be >= data.window_bytes ({self.window_bytes})"
            )
        if self.shard_rows < 1:
            raise ConfigError(f"data.shard_rows must be >= 1, got {self.shard_rows}")
        if self.stride_bytes is not None and self.stride_bytes < 1:
            raise ConfigError(f"data.stride_bytes must be >= 1, got {self.stride_bytes}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class RunSettings:
    """How the platform runs a training: Ray Train scaling and fault tolerance, storage and
    MLflow. Plain data: bitlm itself never imports Ray or MLflow."""

    num_workers: int = 2
    strategy: str = "ddp"  # "ddp" | "fsdp" | "pipeline"
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1  # torch threads in each worker
    checkpoint_every: int = 100  # steps between Ray Train checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 0  # worker failures to recover from (restart from the last checkpoint)
    placement_strategy: str = "PACK"  # PACK | SPREAD (one worker per node where possible) | STRICT_*
    storage_path: str = "runs/ray"  # Train results and checkpoints: local dir, NFS path, s3://, gs://
    experiment: str = "bitlm"  # MLflow experiment
    registered_model: str = "bitlm-{name}"  # the final checkpoint's MLflow model name ("" to skip)
    system_metrics_seconds: float = 10.0  # rank 0's CPU/memory/GPU into the run every N s (0: off)
    fail_at_step: int | None = None  # fault injection for tests: rank 0 raises once at this step

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp", "pipeline"):
            raise ConfigError(f"run.strategy must be ddp, fsdp or pipeline, got {self.strategy!r}")
        if self.num_workers < 1:
            raise ConfigError(f"run.num_workers must be >= 1, got {self.num_workers}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(
                f"run.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}"
            )
        if self.checkpoint_every < 1:
            raise ConfigError(f"run.checkpoint_every must be >= 1, got {self.checkpoint_every}")


# Settings a platform strategy cannot honour, refused by name when a run starts
# (ExperimentConfig.check_platform): (strategy or "*", setting, is it set?, why not).
PLATFORM_REFUSALS: list[tuple[str, str, Any, str]] = [
    ("pipeline", "train.seq_ramp_start_bytes", lambda c: c.train.seq_ramp_start_bytes is not None and c.train.seq_ramp_steps > 0,
     "pipeline stages fix their activation shapes at the first step; a length ramp changes them"),
    ("pipeline", "train.diffusion_prob",
     lambda c: c.model.arch == "byte_patch" and c.train.diffusion and 0 < c.train.diffusion_prob < 1,
     "pipeline stages fix their activation shapes at the first step; byte_patch reads one more patch (the start) "
     "in causal mode than in denoising mode, so one run cannot mix them there (set it to 0 or 1)"),
    ("pipeline", "train.compile_model", lambda c: c.train.compile_model,
     "torch.distributed.pipelining runs its stages eagerly"),
    ("pipeline", "model.reversible", lambda c: c.model.reversible,
     "reversible blocks pass two streams from block to block; pipeline stages pass one"),
    ("fsdp", "model.reversible", lambda c: c.model.reversible,
     "the reversible stack calls each block's branches directly, past FSDP's hooks that gather its parameters"),
    ("*", "train.scale_patience", lambda c: c.train.scale_patience is not None,
     "a Ray run grows its model through Tune's scaling scheduler (tune/sweep.py, scheduler.type: scaling)"),
]  # fmt: skip


@dataclass
class ExperimentConfig:
    """Everything one run needs. Sections are added as the platform grows."""

    name: str = "bitlm"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        self.run.registered_model = self.run.registered_model.replace("{name}", self.name)

    def check_platform(self) -> None:
        """Refuse, naming the setting and the strategy, what the platform's training path
        (Ray Train, pipelines/worker.py) cannot honour under ``run.strategy``."""
        for strategy, setting, is_set, why in PLATFORM_REFUSALS:
            if strategy in ("*", self.run.strategy) and is_set(self):
                where = f"run.strategy={self.run.strategy}" if strategy != "*" else "a Ray Train run"
                raise ConfigError(f"{setting} is not supported with {where}: {why}")


# -- loading ---------------------------------------------------------------------------------


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly coerce: int -> float) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        section = where or cls.__name__
        raise ConfigError(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in {section}; valid keys: {', '.join(names)}"
        )
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict (YAML/JSON-ready) form of a config dataclass."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.d_model": 128, ...}``: the dotted form used by MLflow params and Tune."""
    out: dict[str, Any] = {}
    for k, v in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(cfg: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides applied and re-validated.

    ``overrides`` is ``["model.d_model=256", ...]`` (values parsed as YAML) or a dict
    ``{"model.d_model": 256}``.
    """
    items = overrides.items() if isinstance(overrides, dict) else map(_split_override, overrides)
    data = to_dict(cfg)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            valid = ", ".join(node)
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}; valid keys: {valid}")
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. model.d_model=256)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({type(e).__name__})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an ExperimentConfig from a YAML file (or defaults), then apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections, got {type(data).__name__}")
    cfg = from_dict(ExperimentConfig, data)
    return apply_overrides(cfg, overrides or [])


def dump_config(cfg: Any) -> str:
    """YAML text of a config, as printed at the start of every run."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
