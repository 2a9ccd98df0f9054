"""The guide's ``bit_transformer.utils`` names."""

from .model import set_dropout

__all__ = ["set_dropout"]
