"""Hashed byte n-gram embeddings (after BLT's hash n-gram embeddings, arXiv 2412.09871): a
byte's local context as an input vector, for byte_patch's global input and its local decoder
(and the byte GPT ablation in benchmarks/)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NgramEmbedding(nn.Embedding):
    """Hashed byte n-gram embeddings (after BLT's hash n-gram embeddings, arXiv 2412.09871):
    byte t's vector is the sum, over each size n in ``sizes``, of a row chosen by a hash of the
    n bytes ending at t, one table of ``vocab`` rows per size (collisions share a row). Bytes
    before a window's start count as the value 256, so a window's first bytes have n-grams of
    their own. Causal by construction: byte t's n-grams end at t. It gives the model a byte's
    local context as an input rather than something attention must first learn to gather.

    The history carried between calls is the last ``max(sizes)`` bytes: enough for the
    n-grams ending at the byte before the next one (``before``), which byte_patch's local
    decoder reads. In training, each row a byte reads is left out with probability ``dropout``
    (the rest scaled by 1 / (1 - dropout)): a small corpus is otherwise memorized row by row
    (benchmarks/quality.py, README)."""

    def __init__(self, sizes: list[int], vocab: int, d: int, dropout: float = 0.0):
        super().__init__(len(sizes) * vocab, d)
        self.sizes, self.vocab, self.hist, self.dropout = list(sizes), vocab, max(sizes), dropout
        # Horner's rule over the last hist bytes as one product, the hash's multiplier folded
        # in: size n weighs byte t-j by 257^(n-1-j) * _HASH_MUL, the bytes before the n-gram by
        # 0 (int64 arithmetic wraps modulo 2^64, which the hash is defined in)
        powers = torch.zeros(len(sizes), self.hist, dtype=torch.long)
        for i, n in enumerate(self.sizes):
            powers[i, self.hist - n :] = torch.tensor([_int64(257**k * _HASH_MUL) for k in range(n)])
        self.register_buffer("powers", powers, persistent=False)
        self.register_buffer("offsets", torch.arange(len(sizes)) * vocab, persistent=False)

    def forward(self, values: torch.Tensor, hist: torch.Tensor | None = None, before: bool = False):
        """(embeddings (B, N, C) of the n-grams ending at each byte of ``values`` (B, N), the
        last ``hist`` bytes (B, H) to pass as ``hist`` with the bytes that follow). With
        ``before``, (B, N + 1, C): first the n-grams ending at the byte before ``values``."""
        full = self._full(values, hist)
        window = (full if before else full[:, 1:]).unfold(1, self.hist, 1)  # (B, N (+ 1), hist)
        return self._embed(window), full[:, full.size(1) - self.hist :]

    def last(self, recent: torch.Tensor) -> torch.Tensor:
        """The embedding (B, C) of the n-grams ending at the last of the bytes ``recent`` (B,
        hist), a history as forward returns it: decoding's one row a byte."""
        if self.training and self.dropout:
            return self._embed(recent[:, None, :])[:, 0]
        return F.embedding(self._rows(recent), self.weight).sum(1)  # a few rows: cheaper than a bag

    def _rows(self, window: torch.Tensor) -> torch.Tensor:
        """The table rows (..., sizes) of the n-grams ending at the last byte of each window (..., hist)."""
        x = (window[..., None, :] * self.powers).sum(-1)  # each n-gram, hashed
        return torch.remainder(x >> 17, self.vocab) + self.offsets

    def _embed(self, window: torch.Tensor) -> torch.Tensor:
        """(B, N, C): the n-grams ending at the last byte of each window (B, N, hist)."""
        rows = self._rows(window)  # (B, N, sizes)
        rows2 = rows.view(-1, rows.size(-1))
        keep = None
        if self.training and self.dropout:
            keep = (torch.rand(rows2.shape, device=rows2.device) >= self.dropout).float() / (1 - self.dropout)
        e = F.embedding_bag(rows2, self.weight, mode="sum", per_sample_weights=keep)  # the sizes' rows summed
        return e.view(*rows.shape[:2], -1)

    def history(self, values: torch.Tensor, hist: torch.Tensor | None = None) -> torch.Tensor:
        """The history after bytes ``values`` that followed ``hist``."""
        full = self._full(values, hist)
        return full[:, full.size(1) - self.hist :]

    def _full(self, values: torch.Tensor, hist: torch.Tensor | None) -> torch.Tensor:
        if hist is None:
            hist = values.new_full((values.size(0), self.hist), 256)
        return torch.cat([hist, values], 1)


def _int64(v: int) -> int:
    """``v`` modulo 2^64 as a signed 64-bit integer."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


_HASH_MUL = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing)
