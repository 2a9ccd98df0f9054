"""The guide's ``bit_transformer.training`` import path (``from ... import train_loop``).

Training lives in bitlm.loop (train_loop), bitlm.trainer (one optimizer step) and
bitlm.objectives (batch -> loss, bits per byte)."""

from .loop import TrainHistory, train_loop

__all__ = ["TrainHistory", "train_loop"]
