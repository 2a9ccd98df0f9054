"""The yardstick: a plain byte-level GPT (one position per byte, 256-way softmax).

It is not part of bitlm. It uses bitlm's transformer Block, so the comparison with the bit
models is about what goes in and comes out of the transformer, not about the block itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlm.config import ModelConfig
from bitlm.model import Block
from bitlm.ngrams import NgramEmbedding


def gpt_blocks(d_model: int, nhead: int, num_layers: int, dim_feedforward: int, positions: int, dropout: float):
    """The transformer stack of a byte-level benchmark model: bitlm's own Block."""
    cfg = ModelConfig(
        d_model=d_model,
        nhead=nhead,
        num_layers=num_layers,
        dim_feedforward=dim_feedforward,
        max_seq_len=positions,
        dropout=dropout,
    )
    return nn.ModuleList([Block(cfg) for _ in range(num_layers)])


def init_gpt(model: nn.Module, num_layers: int) -> None:
    """GPT-2's initialization: matrices N(0, 0.02), residual projections scaled by depth, biases 0."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * num_layers) if name.endswith("proj.weight") else 0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class ByteGPT(nn.Module):
    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        max_bytes: int,
        dropout: float = 0.0,
        ngram_sizes: list[int] | None = None,
        ngram_vocab: int = 8192,
        ngram_dropout: float = 0.0,
    ):
        """``ngram_sizes``: the byte_patch model's hashed n-gram embeddings on the input too (the
        ablation that says how much of a difference is the n-grams and how much the bits), with
        its ``ngram_dropout``."""
        super().__init__()
        self.byte_emb = nn.Embedding(256, d_model)
        self.ngram_emb = NgramEmbedding(ngram_sizes, ngram_vocab, d_model, ngram_dropout) if ngram_sizes else None
        self.pos_emb = nn.Embedding(max_bytes, d_model)
        self.blocks = gpt_blocks(d_model, nhead, num_layers, dim_feedforward, max_bytes, dropout)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        init_gpt(self, num_layers)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """Next-byte logits (B, T, 256) for bytes (B, T)."""
        start = cache.length if cache is not None else 0
        h = self.byte_emb(x) + self.pos_emb(torch.arange(start, start + x.size(1), device=x.device))
        if self.ngram_emb is not None:
            e, after = self.ngram_emb(x, None if cache is None else cache.state.get("ngram_hist"))
            h = h + e
            if cache is not None:
                cache.state["ngram_hist"] = after
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)[0]
        if cache is not None:
            cache.length += x.size(1)
        return self.head(self.ln_f(h))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.inference_mode()
    def generate(
        self, prompt: torch.Tensor, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """``n`` bytes after ``prompt`` (B, T) through the KV cache; greedy at temperature 0."""
        from bitlm.model import KVCache
        from bitlm.torch_utils import categorical

        cache = KVCache(len(self.blocks), self.pos_emb.num_embeddings)
        logits = self(prompt, cache)[:, -1]
        out = []
        for _ in range(n):
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = categorical(torch.softmax(logits / temperature, -1), generator)[:, None]  # bitlm's one draw
            out.append(nxt)
            logits = self(nxt, cache)[:, -1]
        return torch.cat(out, 1)


def byte_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of each next byte (B, T) under 256-way logits (B, T, 256)."""
    nll = F.cross_entropy(logits.reshape(-1, 256).float(), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape)


class ByteObjective:
    """The yardstick's own objective for ``bitlm.Trainer``: 256-way next-byte cross-entropy."""

    def __call__(self, forward, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        loss = byte_nll(forward(batch[:, :-1]), batch[:, 1:]).mean()
        return loss, {"loss": loss.item()}
