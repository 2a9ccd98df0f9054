"""Progressive scaling decided by a Tune scheduler.

``ProgressiveScalingScheduler`` watches each trial's validation metric. When it has not
improved by ``min_delta`` for ``patience`` reports in a row (a plateau), the scheduler grows
the trial's model: it doubles the next dimension in ``strategies`` (depth -> num_layers,
width -> d_model and dim_feedforward, context -> max_seq_len), unless the grown model would
pass ``max_params``, writes the new sizes into the trial's config and pauses the trial. Tune
restarts it with the new config; the trial's Train run resumes from its latest checkpoint and
the training function rebuilds the model with ``bitlm.scale.grow_to`` from the checkpointed
weights (function-preserving: it logs validation bits/byte right before and after, which
agree), with fresh optimizer state for new parameters and the old state for the rest.

Trials opt in with the config key ``_grow`` (default true), so one sweep can compare a grown
trial with fixed-size ones under the same scheduler.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

SIZE_KEYS = {
    "depth": ("model.num_layers",),
    "width": ("model.d_model", "model.dim_feedforward"),
    "context": ("model.max_seq_len",),
}


def model_size(experiment: dict[str, Any], overrides: dict[str, Any]) -> int:
    """Parameters of the model a trial config describes (built on the meta device: no memory)."""
    import torch

    from bitlm import BitTransformerLM
    from bitlm.config import ExperimentConfig, apply_overrides, from_dict

    cfg = apply_overrides(from_dict(ExperimentConfig, experiment), overrides)
    with torch.device("meta"):
        return BitTransformerLM(config=cfg.model).num_parameters()


def grown_config(config: dict[str, Any], strategy: str) -> dict[str, Any]:
    """The trial config with the model doubled along ``strategy``."""
    from bitlm.config import ExperimentConfig, apply_overrides, from_dict

    base = from_dict(ExperimentConfig, config["_base"])
    current = apply_overrides(base, {k: v for k, v in config.items() if not k.startswith("_")})
    new = dict(config)
    for key in SIZE_KEYS[strategy]:
        section, name = key.split(".")
        new[key] = getattr(getattr(current, section), name) * 2
    new["_growths"] = [*config.get("_growths", []), strategy]
    return new


class ProgressiveScalingScheduler(FIFOScheduler):
    def __init__(
        self,
        metric: str = "val_bpb",
        mode: str = "min",
        patience: int = 2,
        min_delta: float = 0.0,
        strategies: tuple[str, ...] | list[str] = ("depth", "width", "context"),
        max_params: int | None = None,
        time_attr: str = "step",
    ):
        super().__init__()
        self.watch, self.sign = metric, (1 if mode == "min" else -1)
        self.patience, self.min_delta, self.strategies = patience, min_delta, list(strategies)
        self.max_params, self.time_attr = max_params, time_attr
        self.state: dict[str, dict[str, float]] = {}
        self.events: list[dict[str, Any]] = []

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if self.watch not in result or not trial.config.get("_grow", True) or not self.strategies:
            return TrialScheduler.CONTINUE
        value = self.sign * result[self.watch]
        st = self.state.setdefault(trial.trial_id, {"best": math.inf, "bad": 0, "capped": 0})
        if value < st["best"] - self.min_delta:
            st.update(best=value, bad=0)
            return TrialScheduler.CONTINUE
        st["bad"] += 1
        max_steps = trial.config.get("_max_steps")
        if st["bad"] < self.patience or st["capped"] or (max_steps and result.get(self.time_attr, 0) >= max_steps):
            return TrialScheduler.CONTINUE  # a growth on the last report would train nothing
        strategy = self.strategies[len(trial.config.get("_growths", [])) % len(self.strategies)]
        new = grown_config(trial.config, strategy)
        size = model_size(new["_base"], {k: v for k, v in new.items() if not k.startswith("_")})
        if self.max_params is not None and size > self.max_params:
            st["capped"] = 1
            return TrialScheduler.CONTINUE
        trial.set_config(new)
        st.update(best=math.inf, bad=0)
        self.events.append(
            {"trial": trial.trial_id, "strategy": strategy, self.time_attr: result.get(self.time_attr), "params": size}
        )
        return TrialScheduler.PAUSE
