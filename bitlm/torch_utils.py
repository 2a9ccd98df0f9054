"""The guide's ``bit_transformer.torch_utils``: CPU mixed precision; where random draws
happen when the data may sit on an accelerator; the one categorical draw; and GELU.

The rule for generators: a draw is made on the device of the generator that makes it (torch
refuses a generator of another device) and its result moves to the data. A function given no
generator draws on the data's own device. So a CPU generator gives the same numbers whatever
device the data is on, and a generator built on the data's device draws without a copy.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def cpu_autocast(dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
    """Run the block under CPU autocast (bf16 matmuls, fp32 accumulation where it matters)."""
    with torch.autocast("cpu", dtype=dtype, enabled=enabled):
        yield


class GeneratorDeviceError(ValueError):
    """A generator on another device than the one the call needs it on."""


def draw_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    """Where to draw random numbers for data on ``device``: the generator's device, or the
    data's when there is no generator (see the module docstring)."""
    return torch.device(generator.device) if generator is not None else torch.device(device)


def check_cpu_generator(generator: torch.Generator | None, where: str) -> None:
    """Refuse, naming ``where``, a generator that is not a CPU generator where the call makes
    host-side decisions with it (and saves its state, which only a CPU generator restores on
    every device)."""
    if generator is not None and torch.device(generator.device).type != "cpu":
        raise GeneratorDeviceError(
            f"{where} needs a CPU generator (it draws decisions on the host and its state is saved "
            f"with the run), got one on {generator.device}: pass torch.Generator().manual_seed(seed)"
        )


def uniform_rows(B: int, n: int, generator, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, n) uniform draws in [0, 1) on ``device``, each row's from its own generator when
    ``generator`` is a list of one per row (None: the global generator)."""
    if isinstance(generator, list):
        return torch.stack(
            [torch.rand(n, generator=g, device=draw_device(g, device), dtype=dtype).to(device) for g in generator]
        )
    return torch.rand(B, n, generator=generator, device=draw_device(generator, device), dtype=dtype).to(device)


def categorical(weights: torch.Tensor, generator) -> torch.Tensor:
    """One index (B,) per row of ``weights`` (B, K) (not necessarily normalized), each row's
    from its own generator when there is a list: every categorical draw of bitlm (bits, bytes,
    drafts, denoising). By inverse CDF: one float64 uniform a row against the row's cumulative
    weights, as torch.multinomial draws one sample, but every row's search in one call (a batch
    of requests drew a multinomial each). Index k comes out for u * total in [cdf[k-1], cdf[k]):
    probability weights[k] / total, never a zero weight; u < 1, so u * total rounds to below
    total (round to nearest) and k is at most K - 1. Weights that are negative, not finite or
    all zero in a row are refused by name on the CPU (reading the check costs no device sync
    there); on an accelerator such a row's index is clamped to K - 1 rather than left past the
    end (torch.multinomial's device-side assert would take the process down)."""
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    if weights.device.type == "cpu" and weights.numel():  # three numbers read back (NaN fails every test)
        lo, hi = torch.aminmax(total)
        if not (weights.amin().item() >= 0 and lo.item() > 0 and hi.item() < math.inf):
            raise ValueError("categorical needs finite, non-negative weights with a positive sum in every row")
    u = uniform_rows(weights.size(0), 1, generator, weights.device, torch.float64)
    return torch.searchsorted(cdf, u * total, right=True).squeeze(-1).clamp_max(weights.size(-1) - 1)


# Below this many elements, gelu keeps a CPU tensor off oneDNN (see gelu). Past it, where a
# training step's activations are, oneDNN's kernel is left to do the work it is built for.
ONEDNN_GELU_MIN = 1 << 15


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x)`` (the exact, erf form), the GELU of every bitlm model. On the CPU, ATen hands
    a contiguous float tensor's GELU to oneDNN, whose call has a fixed cost however small the
    tensor, paid at every GELU of a decoding step. A tensor that is not contiguous goes to ATen's
    own kernel instead, which computes the same function (within float32 rounding), so a small
    CPU tensor is passed as a transposed view of itself (its last dimension split in two) and the
    result viewed back. ``benchmarks/gen_speed.py`` measures what it changes (README)."""
    n = x.size(-1) if x.dim() else 1
    if x.is_cpu and x.numel() < ONEDNN_GELU_MIN and n % 2 == 0 and x.is_contiguous():
        return F.gelu(x.unflatten(-1, (2, n // 2)).transpose(-1, -2)).transpose(-1, -2).flatten(-2)
    return F.gelu(x)
