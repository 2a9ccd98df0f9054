"""An experiment, not part of bitlm: byte_patch's design with *dynamic* patches.

Patches end after space-like bytes (a rule like SpaceByte's, arXiv 2404.14408: here a byte that
is not an ASCII letter or digit, and not a byte of a multi-byte UTF-8 character, all of which
count as letters of their word), so the global model steps
once per word rather than once per fixed four bytes, and predicts the first byte of each word,
the hard one, from whole words. It answers one question for benchmarks/quality.py: do such
patches beat fixed ones at equal time? Only training and scoring exist (no decoding), and it
reads bytes (a 256-way softmax per byte, the same bits per byte as byte_patch's softmax local
decoder read bit by bit gives).

The patch rule must be causal, since the patch a byte belongs to decides what predicts it: a
new patch starts at byte u when byte u-1 is space-like and byte u-2 is not (a run of spaces
joins the word after it), or when the patch since the last such start reaches ``max_patch``
bytes (a long word or a long run of punctuation is cut every ``max_patch`` bytes). Both read
bytes before u only.

Everything else is byte_patch's (bitlm/byte_patch.py), on bytes: the global input of a patch is
the sum over its bytes of a (position in patch, value) row and of the hashed n-grams ending at
each; a start vector is position 0, and the global output h_k has seen patches < k and predicts
patch k; byte j of patch k is predicted from h_k plus a local context: ``LayerNorm(pos[j] + the
(position, value) rows of the patch's bytes before j + the n-grams ending at the byte before)``
then ``x + MLP(x)``, through a 256-way head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from byte_gpt import gpt_blocks, init_gpt

from bitlm.ngrams import NgramEmbedding
from bitlm.torch_utils import gelu


def _spacelike() -> torch.Tensor:
    v = torch.arange(256)
    alnum = ((v >= 48) & (v <= 57)) | ((v >= 65) & (v <= 90)) | ((v >= 97) & (v <= 122))
    return ~alnum & (v < 128)  # bytes of multi-byte UTF-8 characters belong to their word


SPACELIKE = _spacelike()


def patch_layout(x: torch.Tensor, max_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch index and position in the patch (B, T + 1) of bytes 0..T of ``x`` (B, T): byte T is
    the one after x, whose patch the bytes before it decide too (module docstring)."""
    B, T = x.shape
    sp = SPACELIKE.to(x.device)[x]
    before1 = F.pad(sp, (1, 0))  # [u]: byte u-1 space-like (u = 0..T)
    before2 = F.pad(sp, (2, 0))[:, : T + 1]  # [u]: byte u-2 space-like
    natural = before1 & ~before2
    natural[:, 0] = True
    idx = torch.arange(T + 1, device=x.device).expand(B, -1)
    last = torch.where(natural, idx, 0).cummax(1).values  # the latest natural start at or before u
    since = idx - last
    offset = since % max_patch  # a forced start every max_patch bytes after a natural one
    return (offset == 0).long().cumsum(1) - 1, offset


class SpacePatchLM(nn.Module):
    """Bytes (B, T) -> next-byte logits (B, T, 256), patches ending after space-like bytes."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_layers: int,
        dim_feedforward: int,
        max_bytes: int,
        max_patch: int = 8,
        dropout: float = 0.0,
        ngram_sizes: list[int] | None = None,
        ngram_vocab: int = 8192,
        ngram_dropout: float = 0.0,
    ):
        super().__init__()
        P, d = max_patch, d_model
        self.max_patch = P
        self.bos = nn.Parameter(torch.zeros(d))
        self.byte_emb = nn.Embedding(256 * P, d)  # (position in patch, value): the global input
        self.ngram_emb = NgramEmbedding(ngram_sizes, ngram_vocab, d, ngram_dropout) if ngram_sizes else None
        self.pos_emb = nn.Embedding(max_bytes + 1, d)  # global positions: at most one patch a byte
        self.blocks = gpt_blocks(d_model, nhead, num_layers, dim_feedforward, max_bytes + 1, dropout)
        self.ln_f = nn.LayerNorm(d)
        self.local_emb = nn.Embedding(256 * P, d)
        self.local_pos_emb = nn.Embedding(P, d)
        self.ln_local = nn.LayerNorm(d)
        self.local_fc = nn.Linear(d, 2 * d)
        self.local_proj = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 256)
        init_gpt(self, num_layers)
        # in training: global positions run (FLOPs), the rows' own positions, windows read
        self.positions_run, self.patches_read, self.windows_run = 0, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape
        C = self.bos.numel()
        pid, offset = patch_layout(x, self.max_patch)
        M = int(pid[:, T].max())  # patches before the last target's: global positions 1..M
        rows = x + 256 * offset[:, :T]
        ngrams = self.ngram_emb(x)[0] if self.ngram_emb is not None else 0  # ending at each byte
        e = self.byte_emb(rows) + ngrams
        # patch k's input at global position k + 1; a row's last patch (pid[:, T] <= M, unfinished)
        # lands at most at M + 1, past the positions run, or at a position no target of its row reads
        g = e.new_zeros(B, M + 2, C).scatter_add_(1, (pid[:, :T] + 1)[..., None].expand(-1, -1, C), e)
        g = g[:, : M + 1]
        g = torch.cat([self.bos.expand(B, 1, C), g[:, 1:]], 1) + self.pos_emb(torch.arange(M + 1, device=x.device))
        for block in self.blocks:
            g = block(g)[0]
        h = self.ln_f(g)
        if self.training:
            self.positions_run += B * (M + 1)  # what ran: every row padded to the longest
            self.patches_read += int(pid[:, T].sum()) + B  # each row's own: its patches and the start
            self.windows_run += B
        targets = pid[:, 1:]  # the patch of each target byte u = 1..T
        c = h.gather(1, targets[..., None].expand(-1, -1, C))  # (B, T, C)
        le = self.local_emb(rows)
        cs = F.pad(le.cumsum(1), (0, 0, 1, 0))  # [i]: the sum of local rows of bytes < i
        j = offset[:, 1:]  # target u's position in its patch
        u = torch.arange(1, T + 1, device=x.device).expand(B, -1)
        before = cs[:, 1:] - cs.gather(1, (u - j)[..., None].expand(-1, -1, C))  # bytes u-j..u-1
        local = self.local_pos_emb(j) + before + ngrams  # n-grams ending at byte u - 1
        local = self.ln_local(local)
        local = local + self.local_proj(gelu(self.local_fc(local)))
        return self.head(c + local)

    def mean_positions(self) -> float:
        """Global positions run per training window so far (start vector included; a batch's
        rows padded to its longest): what the FLOPs count."""
        return self.positions_run / max(1, self.windows_run)

    def mean_patches(self) -> float:
        """Global positions per training window a row needs (start vector included): the
        window's bytes over this, less one, is the patches' mean length."""
        return self.patches_read / max(1, self.windows_run)
