"""Causal self-attention (full, chunked to a local window, or bidirectional for denoising)
and the KV cache that incremental decoding writes into. bitlm.model builds its blocks from it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class KVCache:
    """Keys and values of every position seen so far, per layer, in preallocated buffers.

    ``length`` counts the transformer positions cached; ``state`` holds what an architecture
    needs between calls (the prefix embedding keeps the current byte's bits there). Buffers
    are written in place, so a decoding step costs O(length), not a copy of the cache.

    Rows at different positions (continuous batching, bitlm.batching): ``lengths`` (B,) holds
    each row's own count, ``length`` the largest; such a cache takes one position per call,
    each row's written at its own place, and attention masks every row's keys past its own.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.length = 0  # transformer positions
        self.bits_seen = 0  # input bits
        self.state: dict[str, Any] = {}
        self.lengths: torch.Tensor | None = None  # per row, when rows sit at different positions
        self._mask: tuple | None = None  # (lengths, S, window, mask): one step's, for every layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, H, T, D) after the cached ones; return all of them."""
        B, H, T, D = k.shape
        if self.lengths is not None:
            return self._update_rows(layer, k, v)
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} needed")
        if self.k[layer] is None or self.k[layer].shape[0] != B or self.k[layer].dtype != k.dtype:
            self.k[layer] = k.new_zeros(B, H, self.capacity, D)
            self.v[layer] = v.new_zeros(B, H, self.capacity, D)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _update_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One new position per row, row b's at ``lengths[b]``."""
        B, H, T, D = k.shape
        if T != 1:
            raise ValueError(f"a cache of rows at different positions takes one position a call, not {T}")
        if self.length + 1 > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {self.length + 1} needed")
        rows = torch.arange(B, device=k.device)
        self.k[layer][rows, :, self.lengths] = k[:, :, 0]
        self.v[layer][rows, :, self.lengths] = v[:, :, 0]
        end = self.length + 1
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def row_mask(self, S: int, window: int | None) -> torch.Tensor:
        """(B, 1, 1, S) bool: the keys each row's new query may attend (its own, up to its
        new position, within ``window``); made once a step (``lengths`` is replaced, not
        changed in place, when the rows move on)."""
        if self._mask is not None and self._mask[0] is self.lengths and self._mask[1:3] == (S, window):
            return self._mask[3]
        j = torch.arange(S, device=self.lengths.device)[None, :]
        at = self.lengths[:, None]
        allowed = j <= at
        if window is not None:
            allowed &= at - j < window
        self._mask = (self.lengths, S, window, allowed[:, None, None, :])
        return self._mask[3]


def _window_mask(T: int, S: int, window: int | None, device: torch.device, causal: bool = True) -> torch.Tensor:
    """(T, S) bool: query i (absolute position S - T + i) may attend key j."""
    q = torch.arange(S - T, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    allowed = k <= q if causal else torch.ones(T, S, dtype=torch.bool, device=device)
    if window is not None:
        allowed &= (q - k).abs() < window
    return allowed


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: int, p: float) -> torch.Tensor:
    """Sliding-window causal attention in blocks of c queries: O(T * 2c) instead of O(T^2).

    Query t attends keys t-c < j <= t. Each block of c queries sees its own block and the one
    before it; the mask keeps exactly the window. Equal to masked full attention.
    """
    B, H, T, D = q.shape
    n = -(-T // c)
    pad = n * c - T
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb, kb, vb = (x.view(B, H, n, c, D) for x in (q, k, v))
    kb2 = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)  # (B, H, n, 2c, D)
    vb2 = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
    i = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(2 * c, device=q.device)[None, :]
    mask = ((j > i) & (j <= c + i)).expand(n, c, 2 * c).clone()  # (n, c, 2c)
    mask[0, :, :c] = False  # block 0 has no previous block
    y = F.scaled_dot_product_attention(qb, kb2, vb2, attn_mask=mask, dropout_p=p)
    return y.reshape(B, H, n * c, D)[:, :, :T]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nhead, self.chunk_size, self.dropout = cfg.nhead, cfg.chunk_size, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        need_weights: bool = False,
        causal: bool = True,
    ):
        B, T, C = x.shape
        H, D = self.nhead, C // self.nhead
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        rows = None
        if cache is not None:
            k, v = cache.update(layer, k, v)
            if cache.lengths is not None:  # rows at different positions
                rows = cache.row_mask(k.size(2), self.chunk_size)
        S = k.size(2)  # keys: cached + new
        p = self.dropout if self.training else 0.0
        att = None
        if need_weights:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, S)
            att = att.masked_fill(~_window_mask(T, S, self.chunk_size, x.device, causal), float("-inf"))
            att = F.softmax(att.float(), dim=-1).to(q.dtype)
            y = F.dropout(att, p, self.training) @ v
        elif rows is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=rows, dropout_p=p)
        elif not causal:  # diffusion mode: every position sees the whole window
            mask = None if self.chunk_size is None else _window_mask(T, S, self.chunk_size, x.device, False)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif S == T and (self.chunk_size is None or T <= self.chunk_size):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif S == T:
            y = _local_attention(q, k, v, self.chunk_size, p)
        elif T == 1 and (self.chunk_size is None or S <= self.chunk_size):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # one query sees every key
        else:
            mask = _window_mask(T, S, self.chunk_size, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y), att
