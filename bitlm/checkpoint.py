"""Checkpoints: a directory of ``config.json`` + ``model.safetensors`` (+ training state).

This module knows no model class: it turns (config, tensors) into files and back, and
``bitlm.model.save_pretrained`` / ``load_pretrained`` build and check the model. Loading never
unpickles: weights come from safetensors, and the optional training state (optimizer, step) is
read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
A directory that is not a valid checkpoint raises :class:`CheckpointError` saying what is wrong
with it.

Writes are atomic and checked: every file is written to a temporary name, flushed to disk and
renamed into place, and ``config.json`` (written last: the checkpoint's commit record) holds the
SHA-256 of the weights and of the training state. A reader recomputes them, so a checkpoint cut
short by a crash, or changed since, is refused by name instead of loading garbage; a disk that
fills during a write leaves the files that were there untouched and raises CheckpointError.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig, from_dict, to_dict
from .digest import file_sha256

FORMAT = "bitlm-checkpoint"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, STATE_FILE = "config.json", "model.safetensors", "training_state.pt"


class CheckpointError(ValueError):
    """A path that is not a loadable bitlm checkpoint."""


def _atomic_write(path: Path, write: Callable[[str], None]) -> str:
    """``write(temporary name)``, flushed to disk and renamed to ``path``; returns its SHA-256.
    On any failure the temporary file is removed and ``path`` is as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:  # torch.save and safetensors wrap OS errors
        tmp.unlink(missing_ok=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
        why = "no space left on the device" if full else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"writing {path} failed ({why}); the files that were there are untouched") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _write_config(directory: Path, meta: dict[str, Any]) -> None:
    text = json.dumps(meta, indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def write_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    carried: dict[str, Any] | None = None,
) -> Path:
    """Write a model's config and weights to ``directory`` (created if needed), atomically and
    with checksums (see the module docstring). Over an existing checkpoint the new one is
    written beside it and the two directories are exchanged in one step, so a crash leaves the
    old checkpoint or the new one, never a mix. ``carried``: what the model carries besides its
    weights (JSON-able; tensors go in ``state_dict`` under names starting with ``_``)."""
    directory = Path(directory)
    meta = {"format": FORMAT, "version": VERSION, "model": to_dict(config), "extra": extra or {}}
    meta["carried"] = carried or {}
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    replacing = (directory / CONFIG_FILE).is_file()
    _sweep_stale(directory)
    target = directory.parent / f".{directory.name}.tmp-{os.getpid()}" if replacing else directory
    target.mkdir(parents=True, exist_ok=True)
    try:
        meta["sha256"] = {WEIGHTS_FILE: _atomic_write(target / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp))}
        _write_config(target, meta)
        if replacing:
            for other in directory.iterdir():  # files that are not the checkpoint's stay with it
                if other.name not in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE) and not other.is_dir():
                    shutil.copy2(other, target / other.name)
            _exchange(target, directory)
    finally:
        if replacing:
            shutil.rmtree(target, ignore_errors=True)  # the old checkpoint, or the unfinished new one
    return directory


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); elsewhere by two
    renames (a crash between them leaves ``b`` missing and its old content in ``a``)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is not None and renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:
            return  # -100: AT_FDCWD; 2: RENAME_EXCHANGE
    old = b.parent / f".{b.name}.old-{os.getpid()}"
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def _sweep_stale(directory: Path) -> None:
    """Remove what writers killed mid-write left beside ``directory`` or in it."""
    for stale in [*directory.parent.glob(f".{directory.name}.tmp-*"), *directory.glob(".*.tmp-*")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, someone else's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _verify(directory: Path, config: dict[str, Any], name: str) -> None:
    """Refuse a file whose SHA-256 differs from the one config.json recorded for it."""
    expected = config.get("sha256", {}).get(name)
    if expected is not None and file_sha256(directory / name) != expected:
        raise CheckpointError(
            f"{directory / name} is corrupt or incomplete: its SHA-256 differs from the one "
            f"{CONFIG_FILE} recorded when it was written"
        )


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


# A checkpoint records every model setting its bitlm knew; one it lacks did not exist when it
# was written, and gets the value that was the behaviour then (not today's default).
ABSENT_MEANS: dict[str, Any] = {"ngram_sizes": [], "ngram_dropout": 0.0, "attn_dropout": 0.0, "mode_embedding": False}


def read_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The model config, the tensors and the whole ``config.json`` of a checkpoint directory.
    Whether the tensors fit the config is for the model to check (bitlm.model.load_pretrained)."""
    directory = Path(directory)
    config = read_config(directory)
    try:
        model_cfg = from_dict(ModelConfig, {**ABSENT_MEANS, **config.get("model", {})}, "model")
    except ConfigError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} is not a bitlm checkpoint: {WEIGHTS_FILE} is missing")
    _verify(directory, config, WEIGHTS_FILE)
    try:
        weights = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return model_cfg, weights, config


def save_training_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Optimizer state and counters for resuming (tensors and plain containers only), written
    atomically beside the checkpoint's weights, its SHA-256 recorded in config.json."""
    directory = Path(directory)
    digest = _atomic_write(directory / STATE_FILE, lambda tmp: torch.save(state, tmp))
    if (directory / CONFIG_FILE).is_file():
        meta = read_config(directory)
        meta.setdefault("sha256", {})[STATE_FILE] = digest
        _write_config(directory, meta)


def load_training_state(directory: str | Path) -> dict[str, Any] | None:
    """The state saved by save_training_state, or None when the checkpoint has none."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    if (directory / CONFIG_FILE).is_file():
        _verify(directory, read_config(directory), STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a state we wrote"
        raise CheckpointError(f"{path} is not a loadable training state: {e}") from None
