"""``arch="bit"``: one transformer position per bit, the original BitTransformerLM's layout.

The input side embeds each bit (alone, or where it leaves its byte's prefix tree); the output
side is a linear head that gives the next bit's two logits at every position.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .byte_patch import _TREE_BITS, mode_embedded
from .config import ModelConfig


class BitIO(nn.Module):
    """``arch="bit"``: one transformer position per bit; a linear head gives the next bit.

    With ``bit_embedding="plain"`` a position embeds its bit alone, as the original model does.
    With ``"prefix"`` (the default) it embeds where that bit leaves its byte: the node of the
    byte's prefix tree reached by the bits read so far (phase k < 8: the k+1 leading data bits;
    the parity position: the whole byte), plus the previous byte. Both are functions of the
    input bits up to that position, so the model stays causal and bit-native; it just does not
    have to rediscover byte boundaries through attention. Windows must start on a byte boundary.
    """

    N_NODES = 510 + 256  # prefix nodes of depth 1..8 (2 + 4 + ... + 256), then whole bytes

    def embed_parameter_names(self) -> set[str]:
        """Parameters the input side uses (the first pipeline stage's)."""
        return {"node_emb.weight", "prev_emb.weight", "bit_emb.weight", "mode_emb"}

    def tied_parameter_names(self) -> set[str]:
        """Input-side parameters the output side uses too: none."""
        return set()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_positions = self.max_bits = cfg.max_seq_len
        self.prefix = cfg.bit_embedding == "prefix"
        if self.prefix:
            self.node_emb = nn.Embedding(self.N_NODES, cfg.d_model)
            self.prev_emb = nn.Embedding(257, cfg.d_model)  # 256 = no previous byte
        else:
            self.bit_emb = nn.Embedding(2, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, 2)
        self.mode_emb = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.mode_embedding else None

    def embed(self, bits: torch.Tensor, cache, causal: bool = True):
        x, start = self._embed(bits, cache)
        return mode_embedded(x, self.mode_emb, causal, self.training), start

    def _embed(self, bits: torch.Tensor, cache):
        start = cache.length if cache is not None else 0
        if not self.prefix:
            return self.bit_emb(bits), start
        tail = cache.state.get("tail") if cache is not None else None
        ctx = bits if tail is None else torch.cat([tail, bits], dim=1)
        ctx_start = start - (0 if tail is None else tail.size(1))
        if ctx_start % 9:
            raise ValueError("with bit_embedding='prefix', inputs must start on a byte boundary")
        node, prev = _prefix_features(ctx)
        T = bits.size(1)
        if cache is not None:  # keep the bits from the start of the previous byte on
            end = ctx_start + ctx.size(1)
            keep_from = max(ctx_start, (end // 9 - 1) * 9)
            cache.state["tail"] = ctx[:, keep_from - ctx_start :]
        x = self.node_emb(node[:, -T:]) + self.prev_emb(prev[:, -T:])
        return x, start

    def logits(self, h: torch.Tensor, bits: torch.Tensor, cache, causal: bool = True) -> torch.Tensor:
        return self.head(h)

    def denoise_log_q(self, h: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Denoising: the belief about each clean byte, log q (B, T / 9, 256), from the global
        outputs ``h`` over the noisy window ``bits`` (B, T), T whole bytes: the product of its
        8 data bits' marginals (this head predicts each bit on its own)."""
        B, T = bits.shape
        if T % 9:
            raise ValueError(f"denoising a window of {T} bits, not whole bytes (a multiple of 9)")
        lp = F.log_softmax(self.head(h).float(), -1).view(B, T // 9, 9, 2)[:, :, :8]  # (B, n, 8, 2)
        ones = _TREE_BITS.to(h.device).long()  # (256, 8): byte v's bit at each depth
        return lp[:, :, torch.arange(8, device=h.device), ones].sum(-1)  # (B, n, 256)


_PLACE = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])
_NODE_OFFSET = torch.tensor([2 ** (k + 1) - 2 for k in range(8)] + [510])


def _prefix_features(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-tree node (B, L) of each position and the previous byte (B, L), for bits that
    start on a byte boundary. Vectorized over bytes: prefix values are cumulative sums of the
    data bits' place values, shifted down to the bits read so far."""
    B, L = bits.shape
    x = F.pad(bits, (0, (-L) % 9)).view(B, -1, 9)  # (B, n_bytes, 9)
    cum = (x[..., :8] * _PLACE.to(bits.device)).cumsum(-1)  # (B, n, 8)
    prefix = cum // _PLACE.to(bits.device)  # value of the leading k+1 data bits
    full = prefix[..., 7]  # (B, n) whole byte
    node = torch.cat([prefix, full[..., None]], dim=-1) + _NODE_OFFSET.to(bits.device)
    prev = F.pad(full, (1, 0), value=256)[:, :-1]  # (B, n)
    prev = prev[..., None].expand(-1, -1, 9)
    return node.reshape(B, -1)[:, :L], prev.reshape(B, -1)[:, :L]
