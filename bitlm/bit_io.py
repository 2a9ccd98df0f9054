"""The guide's ``bit_transformer.bit_io`` names: the codec and text sampling."""

from .bits import bits_to_text, enforce_parity, text_to_bits
from .generate import sample_text

__all__ = ["bits_to_text", "enforce_parity", "sample_text", "text_to_bits"]
