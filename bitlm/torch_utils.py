"""The guide's ``bit_transformer.torch_utils``: CPU mixed precision."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def cpu_autocast(dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
    """Run the block under CPU autocast (bf16 matmuls, fp32 accumulation where it matters)."""
    with torch.autocast("cpu", dtype=dtype, enabled=enabled):
        yield
