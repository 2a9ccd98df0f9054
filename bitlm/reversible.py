"""Reversible residual blocks (RevNet coupling): activations recomputed, not stored.

The input x feeds two streams, x1 = x2 = x. Each block maps them by::

    y1 = x1 + f(x2)        (f: attention branch)
    y2 = x2 + g(y1)        (g: MLP branch)

which inverts exactly: x2 = y2 - g(y1), x1 = y1 - f(x2). The stack returns (x1 + x2) / 2.
``reversible_stack`` runs the forward pass without recording a graph and keeps only the last
block's outputs; its backward pass walks the blocks in reverse, rebuilding each block's inputs
from its outputs and differentiating one block at a time. So activation memory is that of one
block, whatever the depth. ``coupled_stack`` is the same function with ordinary autograd (all
activations stored): the reference the reversible gradients are tested against, and the path
used with a KV cache or attention logging.

Dropout inside f and g draws the same masks in the recomputation: each branch's RNG state is
recorded before it runs forward and restored before it runs again.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def coupled_stack(blocks: nn.ModuleList, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
    x1, x2 = x, x
    for block in blocks:
        x1 = x1 + block.f(x2, causal=causal)[0]
        x2 = x2 + block.g(x1)
    return (x1 + x2) / 2


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _restored_rng(state, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _branch_params(block: nn.Module, branch: str) -> list[nn.Parameter]:
    mods = (block.ln1, block.attn) if branch == "f" else (block.ln2, block.mlp)
    return [p for m in mods for p in m.parameters()]


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, causal, *params):
        ctx.blocks, ctx.causal = blocks, causal
        ctx.autocast = (
            x.device.type,
            torch.is_autocast_enabled(x.device.type),
            torch.get_autocast_dtype(x.device.type),
        )
        states = []
        with torch.no_grad():
            x1, x2 = x, x
            for block in blocks:
                s_f = _rng_state(x.device)
                x1 = x1 + block.f(x2, causal=causal)[0]
                s_g = _rng_state(x.device)
                x2 = x2 + block.g(x1)
                states.append((s_f, s_g))
        ctx.states = states
        ctx.save_for_backward(x1.detach(), x2.detach())
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx, dy):
        y1, y2 = ctx.saved_tensors
        device_type, amp, amp_dtype = ctx.autocast
        dy1, dy2 = dy / 2, dy / 2
        grads: dict[int, torch.Tensor] = {}

        def differentiate(out, inp, params, grad_out):
            result = torch.autograd.grad(out, [inp, *params], grad_out, allow_unused=True)
            for p, g in zip(params, result[1:]):
                if g is not None:
                    grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
            return result[0]

        for block, (s_f, s_g) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            with torch.enable_grad(), torch.autocast(device_type, dtype=amp_dtype, enabled=amp):
                y1_ = y1.detach().requires_grad_()
                with _restored_rng(s_g, y1.device):
                    g = block.g(y1_)
                dy1 = dy1 + differentiate(g, y1_, _branch_params(block, "g"), dy2)
                x2 = (y2 - g).detach().requires_grad_()
                with _restored_rng(s_f, y1.device):
                    f = block.f(x2, causal=ctx.causal)[0]
                dx2 = dy2 + differentiate(f, x2, _branch_params(block, "f"), dy1)
            y1, y2 = (y1 - f).detach(), x2.detach()
            dy2 = dx2
        dx = dy1 + dy2  # both streams started as x
        params = [p for block in ctx.blocks for p in block.parameters()]
        return (dx, None, None, *(grads.get(id(p)) for p in params))


def reversible_stack(blocks: nn.ModuleList, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The coupled stack with O(1)-in-depth activation memory (see the module docstring)."""
    if not torch.is_grad_enabled():
        return coupled_stack(blocks, x, causal)
    params = [p for block in blocks for p in block.parameters()]
    return _ReversibleStack.apply(x, blocks, causal, *params)
