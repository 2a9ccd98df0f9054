"""BitTransformerLM: a causal transformer that reads parity-encoded bits and predicts the next bit.

``model(bits)`` takes bits (B, T) and returns ``(logits, telemetry)``: logits (B, T, 2), where
``logits[:, t]`` is the distribution of bit t+1, and telemetry, a dict with K, C, S (see
:mod:`bitlm.telemetry`), per-layer activations and, when asked for, per-layer attention maps.

The file reads top to bottom: attention, block, the model, then long-sequence inference.
Architectures (``arch``): ``"bit"`` runs one transformer position per bit, as the original
BitTransformerLM does; ``"byte_patch"`` (see :mod:`bitlm.byte_patch`) runs one per patch of
bytes and decodes the bits locally.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .telemetry import lz_complexity_logits, negentropy_logits, symbiosis_score


class KVCache:
    """Keys and values of every position seen so far, per layer, in preallocated buffers.

    ``length`` counts the transformer positions cached; ``state`` holds what an architecture
    needs between calls (the prefix embedding keeps the current byte's bits there). Buffers
    are written in place, so a decoding step costs O(length), not a copy of the cache.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = capacity
        self.length = 0  # transformer positions
        self.bits_seen = 0  # input bits
        self.state: dict[str, Any] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, H, T, D) after the cached ones; return all of them."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} needed")
        if self.k[layer] is None or self.k[layer].shape[0] != B or self.k[layer].dtype != k.dtype:
            self.k[layer] = k.new_zeros(B, H, self.capacity, D)
            self.v[layer] = v.new_zeros(B, H, self.capacity, D)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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
        self.nhead, self.chunk_size, self.dropout = cfg.nhead, cfg.chunk_size, cfg.dropout
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
        if cache is not None:
            k, v = cache.update(layer, k, v)
        S = k.size(2)  # keys: cached + new
        p = self.dropout if self.training else 0.0
        att = None
        if need_weights:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, S)
            att = att.masked_fill(~_window_mask(T, S, self.chunk_size, x.device, causal), float("-inf"))
            att = F.softmax(att.float(), dim=-1).to(q.dtype)
            y = F.dropout(att, p, self.training) @ v
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


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.dim_feedforward)
        self.proj = nn.Linear(cfg.dim_feedforward, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block, written as its two residual branches f (attention) and g
    (MLP) so the reversible stack can couple them: y1 = x1 + f(x2), y2 = x2 + g(y1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def f(self, x: torch.Tensor, cache=None, layer: int = 0, need_weights: bool = False, causal: bool = True):
        y, att = self.attn(self.ln1(x), cache, layer, need_weights, causal)
        return self.drop(y), att

    def g(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.mlp(self.ln2(x)))

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0, need_weights: bool = False, causal: bool = True):
        a, att = self.f(x, cache, layer, need_weights, causal)
        x = x + a
        return x + self.g(x), att


def _block_plain(block: Block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    return block(x, causal=causal)[0]


class BitTransformerLM(nn.Module):
    """A transformer language model over parity-encoded bits (9 per UTF-8 byte).

    Arguments are the user guide's (see :class:`bitlm.config.ModelConfig` for all of them and
    their defaults); ``BitTransformerLM(config=cfg)`` takes a ModelConfig directly.
    """

    def __init__(self, config: ModelConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            config = ModelConfig(**{**asdict(config), **kwargs})
        self.config = config
        cfg = config
        if cfg.arch == "byte_patch":
            from .byte_patch import BytePatchIO

            self.io: nn.Module = BytePatchIO(cfg)
        else:
            self.io = BitIO(cfg)
        self.pos_emb = nn.Embedding(self.io.max_positions, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # The guide reads the regularizer weights off the model (``model.lambda_K``).
    @property
    def lambda_K(self) -> float:
        return self.config.lambda_K

    @property
    def lambda_C(self) -> float:
        return self.config.lambda_C

    @property
    def lambda_S(self) -> float:
        return self.config.lambda_S

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory, extra: dict[str, Any] | None = None):
        """Write config.json + model.safetensors to ``directory`` (see bitlm.checkpoint)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory, extra)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> BitTransformerLM:
        """Load a checkpoint directory; raises CheckpointError for anything else."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, map_location)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks), self.pos_emb.num_embeddings)

    def forward(
        self,
        bits: torch.Tensor,
        cache: KVCache | None = None,
        return_attention: bool | None = None,
        causal: bool = True,
        telemetry: bool = True,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Next-bit logits (B, T, 2) and telemetry for bits (B, T) (or (T,) for one sequence).

        With a ``cache`` the call continues the sequence the cache has seen: ``bits`` are the
        new bits only, and the logits equal the full forward pass's at those positions.
        ``causal=False`` is diffusion mode: attention sees the whole window and ``logits[:, t]``
        is the model's belief about the clean value of bit t itself (see bitlm.diffusion).
        ``telemetry=False`` skips K/C/S (an empty dict is returned): the decoding loop's fast path.
        """
        bits = _check_bits(bits)
        if not causal and (cache is not None or self.config.arch != "bit"):
            raise ValueError("diffusion mode (causal=False) needs arch='bit' and no KV cache")
        need_weights = self.config.full_attn_logging if return_attention is None else return_attention
        autocast = torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=self.config.use_autocast and bits.device.type == "cpu"
        )
        with autocast:
            x, start = self.io.embed(bits, cache)  # (B, P, C), first position's index
            if start + x.size(1) > self.pos_emb.num_embeddings:
                raise ValueError(
                    f"sequence needs {start + x.size(1)} positions but max_seq_len allows "
                    f"{self.pos_emb.num_embeddings}; use infer_long_sequence() or a larger "
                    "max_seq_len"
                )
            pos = torch.arange(start, start + x.size(1), device=bits.device)
            x = self.drop(x + self.pos_emb(pos))
            if x.size(1):
                h, acts, atts = self._run_blocks(x, cache, need_weights, causal)
                h = self.ln_f(h)
            else:  # byte_patch: the new bits complete no patch, the local decoder alone answers
                h, acts, atts = x, [], []
            logits = self.io.logits(h, bits, cache).float()  # (B, T, 2)
        offset = 0
        if cache is not None:
            cache.length += x.size(1)
            offset = cache.bits_seen
            cache.bits_seen += bits.size(1)
        return logits, (self._telemetry(logits, bits, acts, atts, offset) if telemetry else {})

    def _run_blocks(self, x: torch.Tensor, cache: KVCache | None, need_weights: bool, causal: bool = True):
        acts: list[torch.Tensor] = []
        atts: list[torch.Tensor] = []
        if self.config.reversible and cache is None and not need_weights:
            from .reversible import reversible_stack

            return reversible_stack(self.blocks, x, causal), acts, atts
        ckpt = self.config.use_checkpoint and self.training and cache is None and not need_weights
        keep_acts = not (self.training and (self.config.reversible or self.config.use_checkpoint))
        if self.config.reversible:
            x1, x2 = x, x
        for i, block in enumerate(self.blocks):
            if self.config.reversible:
                # The same coupling as the reversible stack, run with stored activations
                # (incremental decoding and attention logging need the per-layer state).
                a, att = block.f(x2, cache, i, need_weights, causal)
                x1 = x1 + a
                x2 = x2 + block.g(x1)
                x = (x1 + x2) / 2
            elif ckpt:
                x = checkpoint(_block_plain, block, x, causal, use_reentrant=False)
                att = None
            else:
                x, att = block(x, cache, i, need_weights, causal)
            if keep_acts:
                acts.append(x.detach())
            if att is not None:
                atts.append(att.detach())
        return x, acts, atts

    def _telemetry(self, logits, bits, acts, atts, offset: int = 0) -> dict[str, Any]:
        """K, C, S (batch means, 0-dim tensors), activations and attention maps.

        They carry gradients only when their lambda is set, so logging them costs no memory.
        For ``byte_patch`` they cover the data-bit predictions only: its parity distributions
        are fixed by construction and say nothing about the model (they would pin K near 1
        and S at 0). ``offset`` is the number of bits before ``bits`` (with a KV cache).
        """
        cfg, grad = self.config, torch.is_grad_enabled()
        if cfg.arch == "byte_patch":
            phase = (offset + torch.arange(1, logits.size(1) + 1, device=logits.device)) % 9
            logits = logits[:, phase < 8]
        with torch.set_grad_enabled(grad and cfg.lambda_K > 0):
            k = negentropy_logits(logits).mean()
        with torch.set_grad_enabled(grad and cfg.lambda_C > 0):
            c = lz_complexity_logits(logits).mean()
        with torch.set_grad_enabled(grad and cfg.lambda_S > 0):
            s = symbiosis_score(logits, bits=bits).mean()
        return {
            "negentropy_logits": k,
            "lz_complexity_logits": c,
            "symbiosis_score": s,
            "activations": acts,
            "attention_maps": atts,
        }


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
        return {"node_emb.weight", "prev_emb.weight", "bit_emb.weight"}

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

    def embed(self, bits: torch.Tensor, cache: KVCache | None):
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

    def logits(self, h: torch.Tensor, bits: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        return self.head(h)


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


def _check_bits(bits: Any) -> torch.Tensor:
    if not isinstance(bits, torch.Tensor):
        bits = torch.as_tensor(bits)
    if bits.dim() == 1:
        bits = bits.unsqueeze(0)
    if bits.dim() != 2:
        raise ValueError(f"bits must have shape (batch, seq_len), got {tuple(bits.shape)}")
    if bits.dtype.is_floating_point or bits.dtype == torch.bool:
        bits = bits.long()
    if not torch.compiler.is_compiling() and bits.numel() and (bits.min() < 0 or bits.max() > 1):
        raise ValueError("bits must hold only 0 and 1")
    return bits.long()


@torch.no_grad()
def infer_long_sequence(
    model: BitTransformerLM,
    bits: torch.Tensor,
    chunk_size: int | None = None,
    overlap: int = 0,
    stride: int | None = None,
) -> torch.Tensor:
    """Next-bit logits (B, T, 2) for inputs longer than the model's context.

    Up to ``max_seq_len`` the result is the full forward pass's. Past it, the sequence is
    read in windows of ``chunk_size`` bits (default: the context) that advance by ``stride``
    (default ``chunk_size - overlap``), each starting on a byte boundary; a window's first
    ``chunk_size - stride`` positions are context only, and positions are taken from the
    window where they have the most history. So every position sees at least ``overlap`` bits
    of history (and its own byte), never more than ``chunk_size``.
    """
    bits = _check_bits(bits)
    T = bits.size(1)
    limit = model.io.max_bits
    if T <= limit:
        return model(bits)[0]
    chunk = min(chunk_size or limit, limit)
    chunk -= chunk % 9
    stride = stride if stride is not None else chunk - overlap
    stride -= stride % 9
    if stride <= 0 or stride > chunk:
        raise ValueError(f"stride must be in 9..chunk_size bits (byte-aligned), got {stride}")
    out = torch.empty(bits.size(0), T, 2)
    start = 0
    while True:
        end = min(start + chunk, T)
        logits = model(bits[:, start:end])[0]
        keep_from = 0 if start == 0 else chunk - stride
        out[:, start + keep_from : end] = logits[:, keep_from:]
        if end == T:
            return out
        start += stride
