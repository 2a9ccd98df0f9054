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

from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from bitlm.config import ExperimentConfig, ModelConfig, apply_overrides, from_dict
from bitlm.scale import SIZE_FIELDS, PlateauRule, count_parameters


def _model_config(config: dict[str, Any]) -> ModelConfig:
    """The model a trial config describes: its base with the sampled (and grown) keys."""
    base = from_dict(ExperimentConfig, config["_base"])
    return apply_overrides(base, {k: v for k, v in config.items() if not k.startswith("_")}).model


def model_size(config: dict[str, Any]) -> int:
    """Parameters of the model a trial config describes (built on the meta device: no memory)."""
    return count_parameters(_model_config(config))


def grown_config(config: dict[str, Any], strategy: str) -> dict[str, Any]:
    """The trial config with the model doubled along ``strategy``."""
    current = _model_config(config)
    new = {**config, **{f"model.{name}": getattr(current, name) * 2 for name in SIZE_FIELDS[strategy]}}
    new["_growths"] = [*config.get("_growths", []), strategy]
    return new


class ProgressiveScalingScheduler(FIFOScheduler):
    """Grows a trial's model when bitlm's :class:`~bitlm.scale.PlateauRule` (the rule
    ``train_loop`` uses) calls a plateau in its ``metric``; one rule per trial."""

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
        self.watch, self.mode, self.time_attr = metric, mode, time_attr
        self.rule_args = (patience, min_delta, list(strategies), max_params, mode)
        self.rules: dict[str, PlateauRule] = {}
        self.events: list[dict[str, Any]] = []

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if self.watch not in result or not trial.config.get("_grow", True):
            return TrialScheduler.CONTINUE
        max_steps = trial.config.get("_max_steps")
        if max_steps and result.get(self.time_attr, 0) >= max_steps:
            return TrialScheduler.CONTINUE  # a growth on the last report would train nothing
        rule = self.rules.setdefault(trial.trial_id, PlateauRule(*self.rule_args))
        growths = len(trial.config.get("_growths", []))
        strategy = rule.observe(result[self.watch], _model_config(trial.config), growths)
        if strategy is None:
            return TrialScheduler.CONTINUE
        new = grown_config(trial.config, strategy)
        trial.set_config(new)
        self.events.append(
            {
                "trial": trial.trial_id,
                "strategy": strategy,
                self.time_attr: result.get(self.time_attr),
                "params": model_size(new),
            }
        )
        return TrialScheduler.PAUSE
