"""The sweep file's schema (``sweep:``): what tune/sweep.py runs, over a base experiment
config (bitlm.config). Loaded and checked like every config: unknown keys refused by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, apply_overrides, check_strategies, from_dict


@dataclass
class SchedulerConfig:
    """The Tune scheduler of a sweep: ``asha`` (early stopping), ``fifo`` (none) or ``scaling``
    (progressive scaling: grow a trial's model on a plateau, see tune/scaling.py)."""

    type: str = "asha"
    max_t: int = 1000  # asha: the step budget of a full trial
    grace_period: int = 10  # asha: steps before a trial may be stopped
    reduction_factor: float = 2.0
    patience: int = 2  # scaling: reports without improvement that make a plateau
    min_delta: float = 0.0
    strategies: list[str] = field(default_factory=lambda: ["depth", "width", "context"])
    max_params: int | None = None  # scaling: never grow past this many parameters

    def __post_init__(self) -> None:
        if self.type not in ("asha", "fifo", "scaling"):
            raise ConfigError(f"sweep.scheduler.type must be asha, fifo or scaling, got {self.type!r}")
        check_strategies("sweep.scheduler.strategies", self.strategies)


@dataclass
class SweepConfig:
    """A Tune sweep over a base experiment. ``space`` maps dotted config keys to a sampler:
    ``{type: choice|grid, values: [...]}``, ``{type: uniform|loguniform, low: .., high: ..}``
    or ``{type: randint, low: .., high: ..}``."""

    SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")  # not a field: no annotation
    name: str = "sweep"
    base: str = "configs/tiny.yaml"  # the experiment every trial starts from
    set: list[str] = field(default_factory=list)  # overrides of the base for every trial
    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_bpb"
    mode: str = "min"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_samples: int = 4
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 0.5  # the trial's driver; its Train workers ask for run.cpus_per_worker each
    storage_path: str = "runs/tune"

    def __post_init__(self) -> None:
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or spec.get("type") not in self.SAMPLERS:
                raise ConfigError(f"sweep.space.{key}: needs a type of choice, grid, uniform, loguniform or randint")
            if spec["type"] in ("choice", "grid") and not isinstance(spec.get("values"), list):
                raise ConfigError(f"sweep.space.{key}: {spec['type']} needs a list of values")
            if spec["type"] in ("uniform", "loguniform", "randint") and not {"low", "high"} <= spec.keys():
                raise ConfigError(f"sweep.space.{key}: {spec['type']} needs low and high")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"sweep.mode must be min or max, got {self.mode!r}")


@dataclass
class SweepFile:
    """A sweep YAML: ``sweep:`` (SweepConfig)."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


# -- loading ---------------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load a sweep YAML (``sweep:`` section), then apply ``sweep.``-prefixed overrides."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = from_dict(SweepFile, data)
    return apply_overrides(cfg, overrides or []).sweep
