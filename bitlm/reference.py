"""The reference distribution a model carries: byte-bigram statistics of the data it was
trained on. S (bitlm.telemetry) measures a text's agreement with it.

Counts are kept as a (257, 256) table: row a < 256 counts the byte pairs (a, b) seen inside
training windows, row 256 counts every byte (the unigram). The reference's conditional
distribution smooths each row towards the unigram::

    u(b)      = (n(b) + 1/2) / (N + 128)                 the unigram, add-1/2
    r(b | a)  = (n(a, b) + beta u(b)) / (n(a) + beta)    beta = 4
    H_ref     = sum_a pi(a) H(r(. | a))                  its own conditional entropy, bits/byte

``bitlm.Trainer`` records every micro-batch it trains on (``train_loop`` and the platform's
workers alike), ``save_pretrained`` stores the counts with the weights, and a model with no
recorded data falls back to the reference of the built-in corpus (bitlm.corpus), so that an
untrained model's output is judged against real text rather than against nothing.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

BETA = 4.0
_PLACE = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])


def byte_values(bits: torch.Tensor) -> torch.Tensor:
    """(B, 9n) byte-aligned bits -> (B, n) byte values of their complete bytes."""
    B, T = bits.shape
    groups = bits[:, : T // 9 * 9].reshape(B, -1, 9)[..., :8]
    return (groups * _PLACE.to(bits.device)).sum(-1)


def count_bytes(bits: torch.Tensor) -> torch.Tensor:
    """The (257, 256) counts (float64, on the bits' device) of the bytes and byte pairs of
    windows of bits (B, T) that start on a byte boundary."""
    values = byte_values(bits.detach()).long()
    counts = torch.zeros(257, 256, dtype=torch.float64, device=values.device)
    if values.size(1) > 1:
        pairs = (values[:, :-1] * 256 + values[:, 1:]).reshape(-1)
        counts[:256] += torch.bincount(pairs, minlength=65536).view(256, 256).to(counts.dtype)
    counts[256] += torch.bincount(values.reshape(-1), minlength=256).to(counts.dtype)
    return counts


class Reference:
    """Byte-bigram counts of training data and the tables S reads from them."""

    def __init__(self, counts: torch.Tensor | None = None):
        self.counts = torch.zeros(257, 256, dtype=torch.float64) if counts is None else counts.double()
        if self.counts.shape != (257, 256):
            raise ValueError(f"reference counts must have shape (257, 256), got {tuple(self.counts.shape)}")
        self._tables: tuple[torch.Tensor, float] | None = None

    @property
    def recorded_bytes(self) -> int:
        return int(self.counts[256].sum())

    def observe(self, bits: torch.Tensor) -> None:
        """Count the bytes and byte pairs of windows of bits (B, T) that start on a byte
        boundary (as training windows do)."""
        self.add(count_bytes(bits))

    def add(self, counts: torch.Tensor) -> None:
        """Add a (257, 256) table of counts (``count_bytes``) to the reference."""
        self.counts, self._tables = self.counts.to(counts.device) + counts.to(self.counts.dtype), None

    def tables(self) -> tuple[torch.Tensor, float]:
        """(surprisal table (257, 256) in bits: row a = -log2 r(. | a), row 256 the unigram's;
        H_ref). The built-in corpus's when nothing was recorded. Computed on the counts' device
        (no copy to the host and back), once per change of the counts."""
        if self._tables is None:
            if self.recorded_bytes == 0:
                return builtin_reference().tables()
            self._tables = _tables(self.counts)
        return self._tables

    def surprisal(self, values: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """-log2 r of each byte (B, n) given the byte before it; the first byte of a row is
        scored by the unigram unless ``prev`` (B,) gives the byte before the row."""
        table, _ = self.tables()
        table = table.to(values.device)
        before = torch.full_like(values[:, :1], 256) if prev is None else prev.long().view(-1, 1)
        context = torch.cat([before, values[:, :-1]], 1)
        return table[context, values]

    def bit_log2_probs(self, bits: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """log2 of the reference's distribution of each bit of ``bits`` (B, T) given the bits
        of its byte before it and the byte before that: (B, T, 2); parity positions hold zeros
        (they are never counted). ``offset``: bits before ``bits`` in the stream."""
        B, T = bits.shape
        table, _ = self.tables()
        masses = _node_log2_masses(table).to(bits.device)  # (257, 511): node 0 the root
        pad = offset % 9
        x = torch.cat([bits.new_zeros(B, pad), bits], 1)
        n_bytes = -(-x.size(1) // 9)
        x = torch.nn.functional.pad(x, (0, 9 * n_bytes - x.size(1))).view(B, n_bytes, 9)
        values = (x[..., :8] * _PLACE.to(bits.device)).sum(-1)  # (B, n)
        prev = torch.cat([torch.full_like(values[:, :1], 256), values[:, :-1]], 1)
        depth = torch.arange(8, device=bits.device)
        prefix = values[..., None] >> (8 - depth)  # (B, n, 8): value of the bits before bit d
        node = (1 << depth) - 1 + prefix  # node of depth d (root 0)
        child0 = 2 * node + 1  # its children (heap order)
        row = masses[prev]  # (B, n, 511)
        here = row.gather(2, node)
        logp = torch.stack([row.gather(2, child0) - here, row.gather(2, child0 + 1) - here], -1)  # (B, n, 8, 2)
        parity = logp.new_zeros(B, n_bytes, 1, 2)  # parity positions are never counted (bitlm.telemetry)
        return torch.cat([logp, parity], 2).view(B, 9 * n_bytes, 2)[:, pad : pad + T]


@functools.lru_cache(maxsize=1)
def builtin_reference() -> Reference:
    """The reference of the built-in corpus (Python's pydoc topics)."""
    from .corpus import builtin_corpus

    data = np.frombuffer(builtin_corpus().encode("utf-8"), dtype=np.uint8).astype(np.int64)
    counts = torch.zeros(257, 256, dtype=torch.float64)
    counts[:256] = torch.from_numpy(np.bincount(data[:-1] * 256 + data[1:], minlength=65536).reshape(256, 256))
    counts[256] = torch.from_numpy(np.bincount(data, minlength=256))
    return Reference(counts)


def _tables(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    pairs, unigram = counts[:256], counts[256]
    u = (unigram + 0.5) / (unigram.sum() + 128.0)
    r = (pairs + BETA * u) / (pairs.sum(1, keepdim=True) + BETA)
    surprisal = torch.cat([-torch.log2(r), -torch.log2(u)[None]], 0)
    pi = pairs.sum(1) / pairs.sum().clamp_min(1.0)
    h_ref = float((pi * (r * surprisal[:256]).sum(1)).sum())
    return surprisal.float(), h_ref


def _node_log2_masses(surprisal: torch.Tensor) -> torch.Tensor:
    """log2 of the probability mass under every prefix-tree node, per context row: (rows, 511)
    in heap order (node 0 the root, node k's children 2k+1 and 2k+2; depth-d nodes start at
    2^d - 1, in value order)."""
    logp = -surprisal.double()  # (rows, 256) log2 probabilities
    levels = [logp]
    for _ in range(8):
        x = levels[-1]
        levels.append(torch.logaddexp2(x[..., 0::2], x[..., 1::2]))
    return torch.cat(levels[::-1], -1).float()  # depth 0 (1 node) ... depth 8 (256)
