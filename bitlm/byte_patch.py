"""``arch="byte_patch"``: bits at byte-level cost.

The model still reads the parity-encoded bit sequence and returns one next-bit distribution
per input bit, but the transformer runs one *global* position per patch of ``patch_bytes``
bytes instead of one per bit, and the bits are decoded locally:

- Global input: position 0 is a learned start vector; position k >= 1 embeds patch k-1, the
  sum over its bytes j of a (byte position j, byte value) table row (the row index is a
  function of the 8 data bits, so the input is still bits) and of the hashed n-grams ending at
  each of them (bitlm.ngrams). The global output h_k has seen patches < k only and predicts
  patch k.
- Local decoder: byte j of patch k is decoded from ``c = h_k + (local context of the bytes of
  patch k before j)``, bit by bit, each bit's distribution conditioned on the bits of the byte
  seen so far. Two decoders (``local_decoder``):

  - ``"tree"``: a prefix tree of logistic units, the PAQ/cmix factorization: bit i's logit is
    ``w[n] . c + b[n]`` where ``n = 2^i - 1 + (the value of bits 0..i-1)`` is the tree node
    the bits seen so far reach (255 nodes).
  - ``"softmax"``: a byte distribution ``q = softmax(W c + b)`` over the 256 values, read bit
    by bit: bit i's two logits are the log-masses of the two subtrees below the node the seen
    bits reach, ``log sum q[bytes with prefix + "0"]`` and ``log sum q[... + "1"]``. The
    conditionals multiply back to exactly q. It costs one 256-way projection per byte.

  Either way the 256 byte probabilities are the products along each path, so they sum to 1.
  With P > 1, the local context of byte j is ``x = LayerNorm(pos[j] + sum of (position,
  value) embeddings of bytes 0..j-1 of the patch + the n-grams ending at the byte before)``,
  then ``x + MLP(x)``. The n-grams (the same table as the input's) are the fix for "patch
  lag": h_k knows nothing of patch k, so without them byte j saw its patch's earlier bytes
  only as a bag of embeddings, and P = 4 lost clearly to P = 1 (README).
- Parity: never predicted. Its distribution is set from the 8 data bits with probability 1
  for the correct bit (logits 0 and -1e4), so it costs 0 bits and generation always passes
  the parity check.

Denoising (``causal=False``, diffusion mode): the input is a noisy window and position k of the
global model embeds patch k itself (no start vector), attention sees the whole window, and the
local decoder's byte distribution q of byte j (from h_k and the earlier bytes of its patch, as
read) gives each bit's *marginal*, ``P(bit i = 1) = sum of q over bytes with bit i set`` (and
the parity bit's, over bytes of odd weight): ``logits[:, t]`` is the belief about the clean
bit t itself, as for ``arch="bit"``.

Causality: the logit at bit position t (predicting bit t+1) uses only bits <= t: h for the
patch holding bit t+1 sees earlier patches, the local context sees earlier bytes of the patch,
and the tree node uses the earlier bits of the byte. Incremental decoding keeps the global KV
cache, the output h of the current patch and the unfinished patch (as bits, or as the byte
values decoding feeds, with running sums over them: a byte fed hashes one n-gram row); a byte
costs 1/P of a global step plus the local decoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bits import BYTE_BITS
from .config import ModelConfig
from .ngrams import NgramEmbedding
from .torch_utils import gelu

PARITY_LOGIT = 1e4
_PLACE = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])


def touch_unused(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """``x``, with ``params`` (not used to compute it) taking part times 0: data-parallel
    training waits for a gradient of every parameter in every step, and a model trained in
    both modes uses some parameters in one mode only."""
    for p in params:
        x = x + 0.0 * p.sum()
    return x


def mode_embedded(x: torch.Tensor, mode_emb: torch.Tensor | None, causal: bool, training: bool) -> torch.Tensor:
    """The mode embedding (ModelConfig.mode_embedding) added to every position of a denoising
    window; a causal one is left as it is (while training, touched: see touch_unused)."""
    if mode_emb is None or (causal and not training):
        return x
    return touch_unused(x, mode_emb) if causal else x + mode_emb


class BytePatchIO(nn.Module):
    """Embeds bits into global patch positions and decodes per-bit logits from them."""

    # What a decoding row carries between bytes in its cache's state, one entry per row: the
    # context of its unfinished patch, its n-gram history and (P > 1) the running sums over the
    # patch's bytes so far, _RUNNING (bitlm.batching moves these).
    _RUNNING = ("local_sum", "patch_sum", "ngram_last", "recent")
    ROW_STATE = ("h", "ngram_hist", "tail_values") + _RUNNING

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.P = cfg.patch_bytes
        self.patch_bits = 9 * self.P
        self.max_bits = cfg.max_seq_len
        self.max_positions = cfg.max_seq_len // self.patch_bits + 2  # start vector + patches
        d = cfg.d_model
        self.bos_emb = nn.Embedding(1, d)
        self.mode_emb = nn.Parameter(torch.zeros(d)) if cfg.mode_embedding else None
        self.byte_emb = nn.Embedding(256 * self.P, d)  # (byte position in patch, value)
        self.ngram_sizes = list(cfg.ngram_sizes or [])
        if self.ngram_sizes:
            self.ngram_emb = NgramEmbedding(self.ngram_sizes, cfg.ngram_vocab, d, cfg.ngram_dropout)
        if self.P > 1:
            self.local_emb = nn.Embedding(256 * self.P, d)  # earlier bytes of the patch, for the decoder
            self.local_pos_emb = nn.Embedding(self.P, d)
            self.ln_local = nn.LayerNorm(d)
        self.local_decoder = cfg.local_decoder
        if self.local_decoder == "tree":
            self.tree = nn.Linear(d, 255)
        else:
            self.byte_head = nn.Linear(d, 256)
        if self.P > 1:
            self.local_fc = nn.Linear(d, 2 * d)
            self.local_proj = nn.Linear(2 * d, d)

    def embed_parameter_names(self) -> set[str]:
        """Parameters the input side uses (the first pipeline stage's)."""
        names = {"bos_emb.weight", "byte_emb.weight"} | ({"mode_emb"} if self.mode_emb is not None else set())
        return names | ({"ngram_emb.weight"} if self.ngram_sizes else set())

    def tied_parameter_names(self) -> set[str]:
        """Input-side parameters the output side uses too (the last pipeline stage's): with
        several bytes per patch the local decoder reads the n-gram table."""
        return {"ngram_emb.weight"} if self.ngram_sizes and self.P > 1 else set()

    # -- input ------------------------------------------------------------------------------

    def embed(self, bits: torch.Tensor, cache, causal: bool = True):
        """Global inputs for the patch positions that ``bits`` makes computable."""
        B = bits.size(0)
        if not causal:  # every patch of the (noisy) window, the last one padded
            n = -(-bits.size(1) // self.patch_bits)
            flat = _byte_values(F.pad(bits, (0, n * self.patch_bits - bits.size(1))))
            values = flat.view(B, n, self.P)
            x = self.byte_emb(values + 256 * torch.arange(self.P, device=bits.device)).sum(2)
            x = x + self._ngrams(flat, None)
            if self.training:  # the start vector, unused here, takes part (see touch_unused)
                x = touch_unused(x, self.bos_emb.weight)
            return mode_embedded(x, self.mode_emb, causal, self.training), 0
        if cache is None:
            ctx, start = bits, 0
        else:
            for k in self._RUNNING:  # bits in: the running sums go stale, and are remade when read
                cache.state.pop(k, None)
            tail = self._tail_bits(cache)
            ctx = bits if tail is None else torch.cat([tail, bits], 1)
            start = cache.length
            cache.state["ctx_hist"] = cache.state.get("ngram_hist")  # the n-gram history before ctx
        n_complete = ctx.size(1) // self.patch_bits
        parts = []
        if start == 0:
            parts.append(self.bos_emb.weight.expand(B, 1, -1))
        if n_complete:
            values = _byte_values(ctx[:, : n_complete * self.patch_bits]).view(B, n_complete, self.P)
            rows = values + 256 * torch.arange(self.P, device=bits.device)
            e = self.byte_emb(rows).sum(2)  # (B, n_complete, C)
            if self.ngram_sizes:
                e = e + self._ngrams(values.view(B, -1), cache)
            parts.append(e)
        x = torch.cat(parts, 1) if parts else bits.new_zeros(B, 0, self.bos_emb.embedding_dim, dtype=torch.float)
        x = mode_embedded(x, self.mode_emb, causal, self.training)
        if cache is not None:
            cache.state["ctx"] = ctx  # the unfinished patch plus the new bits, for logits()
            cache.state["tail"] = ctx[:, n_complete * self.patch_bits :]
        return x, start

    def embed_bytes(self, values: torch.Tensor, cache):
        """Decoding's short way in: global inputs (B, n, C) and the first one's position (an int,
        or the rows' own (B,) in a cache of rows at different positions) for whole bytes
        ``values`` (B, n) fed through ``cache`` at a byte boundary; what embed() gives for the
        bytes' bits, without reading bits (generation drew the bytes, so there is nothing to
        check or unpack). With one byte per patch every byte is a global input; with several,
        ``values`` is one byte (B, 1), kept in the unfinished patch until it completes one (then
        the patch's input, (B, 1, C); else none, (B, 0, C))."""
        if cache.length == 0:
            raise ValueError(
                "embed_bytes continues a sequence: feed its first bytes through forward (the start vector)"
            )
        start = cache.length if cache.lengths is None else cache.lengths
        if self.P > 1:
            if values.size(1) != 1:
                raise ValueError("with several bytes per patch, embed_bytes takes one byte a call")
            return self._feed_patch_byte(values, cache), start
        else:
            tail = cache.state.get("tail")
            if tail is not None and tail.size(1):
                raise ValueError("whole bytes only: the sequence so far ends inside a byte")
            x = self.byte_emb(values)
        if self.ngram_sizes:
            x = x + self._ngrams(values, cache)
        cache.state["tail"] = cache.state["tail_values"] = None
        return x, start

    @staticmethod
    def _tail_bits(cache) -> torch.Tensor | None:
        """The bits of the unfinished patch, which decoding may have kept as byte values."""
        values = cache.state.pop("tail_values", None)
        if values is not None:
            cache.state["tail"] = BYTE_BITS.to(values.device)[values].flatten(1)
        return cache.state.get("tail")

    @staticmethod
    def patch_so_far(cache) -> torch.Tensor:
        """The values (B, j) of the unfinished patch's bytes, kept so in the cache from here on
        (decoding's form); the sequence must end on a byte."""
        values = cache.state.get("tail_values")
        if values is not None:
            return values
        tail = cache.state.get("tail")
        if tail is not None and tail.size(1) % 9:
            raise ValueError("whole bytes only: the sequence so far ends inside a byte")
        if tail is None or not tail.size(1):
            h = cache.state["h"]
            values = torch.zeros(h.size(0), 0, dtype=torch.long, device=h.device)
        else:
            values = _byte_values(tail)
        cache.state["tail"], cache.state["tail_values"] = None, values
        return values

    def _ngrams(self, values: torch.Tensor, cache) -> torch.Tensor:
        """The n-gram embeddings of bytes ``values`` (B, N), summed per patch (B, N / P, C); the
        history (bytes before them) is the cache's, else that of a window's start."""
        if not self.ngram_sizes:
            return 0
        hist = None if cache is None else cache.state.get("ngram_hist")
        e, after = self.ngram_emb(values, hist)
        if cache is not None:
            cache.state["ngram_hist_before"], cache.state["ngram_hist"] = hist, after
        if self.P == 1:
            return e
        B, N = values.shape
        return e.view(B, N // self.P, self.P, -1).sum(2)

    # -- output -----------------------------------------------------------------------------

    def logits(self, h: torch.Tensor, bits: torch.Tensor, cache, causal: bool = True) -> torch.Tensor:
        """Next-bit logits (B, T, 2) for the new bits, from global outputs ``h`` (denoising:
        each bit's marginal, see the module docstring)."""
        if not causal:
            return self._marginal_logits(h, bits)
        if cache is None:
            return self._local_logits(h, bits)
        ctx, hist = cache.state.pop("ctx"), cache.state.pop("ctx_hist", None)
        prev = cache.state.get("h")
        h_all = h if prev is None else torch.cat([prev, h], 1)
        out = self._local_logits(h_all, ctx, hist)[:, -bits.size(1) :]
        cache.state["h"] = h_all[:, -1:]  # the context of the unfinished patch
        return out

    def advance(self, h: torch.Tensor, cache) -> None:
        """What logits() keeps in the cache, without computing any logits; the new positions'
        outputs as ``h_all`` (speculative decoding reads the byte distribution after each)."""
        cache.state.pop("ctx", None)
        cache.state.pop("ctx_hist", None)
        if h.size(1):
            cache.state["h"] = h[:, -1:]
        cache.state["h_all"] = h

    def trim_state(self, cache, kept: torch.Tensor) -> None:
        """After the cache was cut back to end with bytes ``kept`` (B, n) of the last call (whole
        patches): the n-gram history as if only those had been fed."""
        if self.ngram_sizes:
            before = cache.state.get("ngram_hist_before")
            cache.state["ngram_hist"] = self.ngram_emb.history(kept, before)

    def _local_logits(self, h: torch.Tensor, bits: torch.Tensor, hist: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for bits (B, L) that start at the patch whose context is h[:, 0], after the
        n-gram history ``hist`` (None: a window's start)."""
        B, L = bits.shape
        n_bytes = L // 9 + 1  # the byte of the last target (bit L) too
        padded = F.pad(bits, (0, 9 * n_bytes - L))
        values = _byte_values(padded)  # (B, n_bytes); only prefixes of seen bits are used
        byte_pos = torch.arange(n_bytes, device=bits.device)
        c = h[:, byte_pos // self.P]  # (B, n_bytes, C) the patch context of each byte
        if self.P > 1:
            c = c + self._local_context(values, hist)
        # targets p = 1..L: byte p // 9, phase p % 9
        p = torch.arange(1, L + 1, device=bits.device)
        byte, phase = p // 9, p % 9
        data = phase < 8
        depth = phase.clamp(max=7)  # parity targets get a dummy node, replaced below
        prefix = values[:, byte] >> (8 - depth)  # (B, L) value of the bits before this one
        if self.local_decoder == "tree":
            node = (1 << depth) - 1 + prefix
            z = self.tree(c).reshape(B, -1).gather(1, byte * 255 + node)  # (B, L)
            out = torch.stack([torch.zeros_like(z), z], -1)  # P(bit = 1) = sigmoid(z)
        else:
            masses = _subtree_log_masses(F.log_softmax(self.byte_head(c).float(), -1))  # (B, n_bytes, 510)
            child0 = (1 << (depth + 1)) - 2 + 2 * prefix  # node of depth + 1 below the seen bits
            flat = masses.reshape(B, -1)
            base = byte * 510
            out = torch.stack([flat.gather(1, base + child0), flat.gather(1, base + child0 + 1)], -1)
        parity = _parity(values)[:, byte].to(out.dtype)  # (B, L) correct parity of each target's byte
        fixed = torch.stack([-PARITY_LOGIT * parity, -PARITY_LOGIT * (1 - parity)], -1)
        return torch.where(data[None, :, None], out, fixed)

    def next_byte_log_probs(self, cache) -> torch.Tensor:
        """The next byte's distribution, log q (B, 256), from the cache alone: drawing a byte
        from it is drawing its bits one by one through the model (their conditionals multiply
        back to q), without a model call per bit."""
        c = cache.state["h"][:, 0]  # (B, C): the context of the unfinished patch
        if self.P > 1:  # _local_context's row for the next byte, from the running sums
            s = self._running(cache)
            x = self.local_pos_emb.weight[s["tail_values"].size(1)] + s["local_sum"]
            c = c + self._local_mix(x + s["ngram_last"] if self.ngram_sizes else x)
        return self._byte_log_probs(c)

    def _running(self, cache) -> dict:
        """The cache's state with the running sums over the unfinished patch's bytes (B, C) of
        the local decoder's inputs, of the global input and (with n-grams) the n-gram row ending
        at the last byte and the bytes (B, hist) that end there: made from the patch's bytes
        when a pass of bits left none (a prompt, a restart), then kept up by each byte fed."""
        s = cache.state
        if s.get("local_sum") is None:
            before = self.patch_so_far(cache)
            rows = before + 256 * torch.arange(before.size(1), device=before.device)
            s["local_sum"], s["patch_sum"] = self.local_emb(rows).sum(1), self.byte_emb(rows).sum(1)
            if self.ngram_sizes:  # rows ending at the byte before the patch, then at each of its bytes
                if s.get("ngram_hist") is None:  # no patch yet: a window's start, as a tensor a lane can join
                    s["ngram_hist"] = before.new_full((before.size(0), self.ngram_emb.hist), 256)
                e, s["recent"] = self.ngram_emb(before, s["ngram_hist"], before=True)
                s["ngram_last"], s["patch_sum"] = e[:, -1], s["patch_sum"] + e[:, 1:].sum(1)
        return s

    def _feed_patch_byte(self, values: torch.Tensor, cache) -> torch.Tensor:
        """embed_bytes for one byte (B, 1) with several bytes per patch: the running sums take
        it in (one n-gram row hashed); the patch's global input (B, 1, C) when it completes
        one, else none (B, 0, C)."""
        s = self._running(cache)
        before = s["tail_values"]
        row = values[:, 0] + 256 * before.size(1)  # (position in the patch, value)
        s["patch_sum"] = s["patch_sum"] + self.byte_emb(row)
        if self.ngram_sizes:
            s["recent"] = torch.cat([s["recent"][:, 1:], values], 1)
            s["ngram_last"] = self.ngram_emb.last(s["recent"])
            s["patch_sum"] = s["patch_sum"] + s["ngram_last"]
        s["tail"] = None
        if before.size(1) + 1 < self.P:  # the patch goes on: no global input yet
            s["local_sum"] = s["local_sum"] + self.local_emb(row)
            s["tail_values"] = torch.cat([before, values], 1)  # kept as values: decoding reads them so
            return s["patch_sum"].new_zeros(values.size(0), 0, s["patch_sum"].size(-1))
        x = s["patch_sum"][:, None]  # the patch is complete: the sums start again
        s["ngram_hist_before"], s["ngram_hist"] = s.get("ngram_hist"), s.get("recent")
        zero = torch.zeros_like(x[:, 0])  # (the sums are replaced, never written in place)
        s["tail_values"], s["local_sum"], s["patch_sum"] = before[:, :0], zero, zero
        return x

    def _byte_log_probs(self, c: torch.Tensor) -> torch.Tensor:
        """log q (..., 256): the local decoder's byte distribution at contexts c (..., C)."""
        if self.local_decoder != "tree":
            return F.log_softmax(self.byte_head(c).float(), -1)
        z = self.tree(c).float()  # (..., 255) node logits: log-odds of bit = 1 at the node
        nodes, ones = _TREE_NODES.to(c.device), _TREE_BITS.to(c.device)  # (256, 8)
        zz = z[..., nodes]  # (..., 256, 8)
        return torch.where(ones, F.logsigmoid(zz), F.logsigmoid(-zz)).sum(-1)

    def denoise_log_q(self, h: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Denoising: the belief about each clean byte, log q (B, ceil(T / 9), 256), from the
        global outputs ``h`` over the noisy window ``bits`` (B, T)."""
        B, T = bits.shape
        n_bytes = -(-T // 9)
        values = _byte_values(F.pad(bits, (0, 9 * n_bytes - T)))  # the noisy bytes as read
        c = h[:, torch.arange(n_bytes, device=bits.device) // self.P]
        if self.P > 1:
            c = c + self._local_context(values, None)
        return self._byte_log_probs(c)

    def _marginal_logits(self, h: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        B, T = bits.shape
        logq = self.denoise_log_q(h, bits)  # (B, n, 256)
        masses = _subtree_log_masses(logq)  # depth d's nodes at 2^d - 2, in value order
        ones = [
            torch.logsumexp(masses[..., (1 << (d + 1)) - 2 :][..., : 1 << (d + 1)][..., 1::2], -1) for d in range(8)
        ]
        log1 = torch.stack(ones, -1)  # (B, n, 8) log P(bit d = 1)
        log0 = torch.log1p(-log1.exp().clamp(max=1 - 1e-6))
        odd = torch.logsumexp(logq.masked_fill(~_ODD.to(bits.device), float("-inf")), -1)
        log1 = torch.cat([log1, odd[..., None]], -1)
        log0 = torch.cat([log0, torch.log1p(-odd.exp().clamp(max=1 - 1e-6))[..., None]], -1)
        return torch.stack([log0, log1], -1).view(B, -1, 2)[:, :T]

    def _local_context(self, values: torch.Tensor, hist: torch.Tensor | None) -> torch.Tensor:
        """Local context (B, n_bytes, C) of bytes ``values`` (B, n_bytes) that start a patch after
        the n-gram history ``hist`` (None: a window's start): byte j of a patch sees its
        position, bytes 0..j-1 of its patch and, with n-grams, the n-grams ending at the byte
        before it, which may sit in the patch before. That last term is what the global context
        h of a patch lacks for its later bytes ("patch lag": h has seen only earlier patches)."""
        B, n = values.shape
        j = torch.arange(n, device=values.device) % self.P
        e = self.local_emb(values + 256 * j)  # (B, n, C)
        pad = (-n) % self.P
        e = F.pad(e, (0, 0, 0, pad)).view(B, -1, self.P, e.size(-1))
        before = e.cumsum(2) - e  # sum of the earlier bytes of the same patch
        x = before.view(B, -1, e.size(-1))[:, :n] + self.local_pos_emb(j)
        if self.ngram_sizes:
            x = x + self.ngram_emb(values, hist, before=True)[0][:, :n]  # row i: ending at byte i - 1
        return self._local_mix(x)

    def _local_mix(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_local(x)
        return x + self.local_proj(gelu(self.local_fc(x)))


_VALUES = torch.arange(256)
_DEPTH = torch.arange(8)
_TREE_NODES = (1 << _DEPTH) - 1 + (_VALUES[:, None] >> (8 - _DEPTH))  # (256, 8) node at each depth
_TREE_BITS = ((_VALUES[:, None] >> (7 - _DEPTH)) & 1).bool()  # (256, 8) the bit taken there
_ODD = _TREE_BITS.sum(-1) % 2 == 1  # bytes whose even-parity bit is 1
# _TURNS[n, v]: +1 if byte v's path turns to bit 1 at node n, -1 if to bit 0, 0 if it misses n
_TURNS = torch.zeros(255, 256)
_TURNS[_TREE_NODES, _VALUES[:, None].expand(256, 8)] = torch.where(_TREE_BITS, 1.0, -1.0)
_ZERO_TURNS = (~_TREE_BITS).sum(-1).float()  # (256,) the 0 bits of each byte
_NODE_DEPTH = torch.tensor([d for d in range(8) for _ in range(1 << d)])  # heap order, 255 nodes
_NODE_CHILD0 = (1 << (_NODE_DEPTH + 1)) - 2 + 2 * (torch.arange(255) - ((1 << _NODE_DEPTH) - 1))
# _NODE_CHILD0[n]: where node n's child "0" sits among _subtree_log_masses' depth-1..8 nodes


def node_logits(logq: torch.Tensor) -> torch.Tensor:
    """Every prefix-tree node's bit logits (..., 255, 2) from byte log-probabilities (..., 256),
    in heap order (node 0 the first bit, node 2^d - 1 + v the bit after prefix v of d bits):
    the log-masses of the subtrees below its two children."""
    masses = _subtree_log_masses(logq)
    child0 = _NODE_CHILD0.to(logq.device)
    return torch.stack([masses[..., child0], masses[..., child0 + 1]], -1)


def _subtree_log_masses(logq: torch.Tensor) -> torch.Tensor:
    """Log-probability mass of every prefix-tree node of depth 1..8 (..., 510) from byte
    log-probabilities (..., 256): depth d's 2^d nodes sit at offset 2^d - 2, in value order."""
    levels = [logq]
    for _ in range(7):
        x = levels[-1]
        levels.append(torch.logaddexp(x[..., 0::2], x[..., 1::2]))
    return torch.cat(levels[::-1], -1)  # depth 1 (2 nodes) first, depth 8 (256) last


def _byte_values(bits: torch.Tensor) -> torch.Tensor:
    """(B, 9n) bits -> (B, n) byte values from their 8 data bits."""
    B = bits.size(0)
    groups = bits.view(B, -1, 9)[..., :8]
    return (groups * _PLACE.to(bits.device)).sum(-1)


def _parity(values: torch.Tensor) -> torch.Tensor:
    """Even parity bit of byte values."""
    v = values
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return v & 1
