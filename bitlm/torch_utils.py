"""The guide's ``bit_transformer.torch_utils``: CPU mixed precision; and where random draws
happen when the data may sit on an accelerator.

The rule for generators: a draw is made on the device of the generator that makes it (torch
refuses a generator of another device) and its result moves to the data. A function given no
generator draws on the data's own device. So a CPU generator gives the same numbers whatever
device the data is on, and a generator built on the data's device draws without a copy.
"""

from __future__ import annotations

import contextlib

import torch


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
