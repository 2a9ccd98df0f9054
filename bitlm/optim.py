"""The optimizer: AdamW with weight decay on matrices only, and carrying its state across
changes of the model (a resumed run whose model grew, a model expanded in place).

Parameters are put in two groups, in the order of ``model.named_parameters()``: the decayed
matrices, then everything else (norms, biases, embeddings). ``optimizer_param_names`` gives
that order, so a saved optimizer state can be matched to parameters by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _decays(model: nn.Module) -> dict[str, bool]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: p.dim() >= 2 and id(p) not in embeddings for n, p in model.named_parameters() if p.requires_grad}


def configure_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: never on norms, biases or embeddings.

    ``fused``: one fused kernel updates every parameter (CPU and CUDA); otherwise torch picks
    its default (multi-tensor on CUDA). False is passed as None: an explicit False would also
    turn the multi-tensor path off and step one parameter at a time."""
    decays = _decays(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n, d in decays.items() if d], "weight_decay": weight_decay},
        {"params": [params[n] for n, d in decays.items() if not d], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True if fused else None)


def optimizer_param_names(model: nn.Module) -> list[str]:
    """Parameter names in the order configure_optimizer puts them in its state dict."""
    decays = _decays(model)
    return [n for n, d in decays.items() if d] + [n for n, d in decays.items() if not d]


def remap_optimizer_state(
    old_names: list[str], old_state: dict, new_model: nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Load the state of an optimizer built by configure_optimizer for a model with parameter
    names ``old_names`` into ``optimizer`` (built the same way for ``new_model``), for every
    parameter whose name and shape are unchanged; others start fresh. Returns how many were
    carried over."""
    params = dict(new_model.named_parameters())
    old_index = {name: i for i, name in enumerate(old_names)}
    # The step count stays on the CPU unless a fused (or capturable) step reads it on the device,
    # as Optimizer.load_state_dict places it: a device step costs a sync per parameter per step.
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    carried = 0
    for name in optimizer_param_names(new_model):
        entry = old_state["state"].get(old_index.get(name, -1))
        if entry is not None and entry["exp_avg"].shape == params[name].shape:
            device = params[name].device  # the saved state may come from another device (a CPU load)
            optimizer.state[params[name]] = {
                k: _place(k, v, device, step_on_device) if torch.is_tensor(v) else v for k, v in entry.items()
            }
            carried += 1
    return carried


def _place(key: str, value: torch.Tensor, device: torch.device, step_on_device: bool) -> torch.Tensor:
    if key != "step":
        return value.to(device).clone()
    return value.to(device, torch.float32).clone() if step_on_device else value.cpu().clone()
