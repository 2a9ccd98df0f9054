"""The guide's ``bit_transformer.utils`` names."""

from .training import set_dropout

__all__ = ["set_dropout"]
