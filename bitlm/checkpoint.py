"""Checkpoints: a directory of ``config.json`` + ``model.safetensors`` (+ training state).

This module knows no model class: it turns (config, tensors) into files and back, and
``bitlm.model.save_pretrained`` / ``load_pretrained`` build and check the model. Loading never
unpickles: weights come from safetensors, and the optional training state (optimizer, step) is
read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. A directory that is not a valid checkpoint raises :class:`CheckpointError`
saying what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig, from_dict, to_dict

FORMAT = "bitlm-checkpoint"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, STATE_FILE = "config.json", "model.safetensors", "training_state.pt"


class CheckpointError(ValueError):
    """A path that is not a loadable bitlm checkpoint."""


def write_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    carried: dict[str, Any] | None = None,
) -> Path:
    """Write a model's config and weights to ``directory`` (created if needed). ``carried``:
    what the model carries besides its weights (JSON-able; tensors go in ``state_dict`` under
    names starting with ``_``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": VERSION, "model": to_dict(config), "extra": extra or {}}
    meta["carried"] = carried or {}
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed and checked ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a checkpoint directory (no such directory)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a bitlm checkpoint: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bitlm checkpoint config (format is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {config.get('version')!r}; this bitlm reads {VERSION}")
    return config


def read_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The model config, the tensors and the whole ``config.json`` of a checkpoint directory.
    Whether the tensors fit the config is for the model to check (bitlm.model.load_pretrained)."""
    directory = Path(directory)
    config = read_config(directory)
    try:
        model_cfg = from_dict(ModelConfig, config.get("model", {}), "model")
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} is not a bitlm checkpoint: {WEIGHTS_FILE} is missing")
    try:
        weights = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return model_cfg, weights, config


def save_training_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Optimizer state and counters for resuming (tensors and plain containers only)."""
    torch.save(state, Path(directory) / STATE_FILE)


def load_training_state(directory: str | Path) -> dict[str, Any] | None:
    """The state saved by save_training_state, or None when the checkpoint has none."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a state we wrote"
        raise CheckpointError(f"{path} is not a loadable training state: {e}") from None
