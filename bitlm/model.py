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

import contextlib
import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import CausalSelfAttention, KVCache
from .bit_arch import BitIO
from .byte_patch import BytePatchIO
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .config import ModelConfig
from .reference import Reference
from .reversible import reversible_stack
from .telemetry import logit_telemetry
from .torch_utils import gelu


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.dim_feedforward)
        self.proj = nn.Linear(cfg.dim_feedforward, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gelu(self.fc(x)))


def apply_dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)``, skipped where it is the identity (eval mode, or p = 0; set_dropout changes p):
    a module call costs a few microseconds, and a decoding step at 4 layers makes 9."""
    return drop(x) if drop.training and drop.p else x


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
        return apply_dropout(self.drop, y), att

    def g(self, x: torch.Tensor) -> torch.Tensor:
        return apply_dropout(self.drop, self.mlp(self.ln2(x)))

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
        config = config.resolved()  # the architecture's defaults where the config left them
        self.config = config
        cfg = config
        # What the model carries besides its weights (saved with them): the reference S judges
        # text against, recorded from the data it trains on, and the modes it was trained in.
        self.reference = Reference()
        self.trained_modes: set[str] = set()
        self.io: nn.Module = BytePatchIO(cfg) if cfg.arch == "byte_patch" else BitIO(cfg)
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
        return save_pretrained(self, directory, extra)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> BitTransformerLM:
        """Load a checkpoint directory; raises CheckpointError for anything else."""
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
        decode: bool = True,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Next-bit logits (B, T, 2) and telemetry for bits (B, T) (or (T,) for one sequence).

        With a ``cache`` the call continues the sequence the cache has seen: ``bits`` are the
        new bits only, and the logits equal the full forward pass's at those positions.
        ``causal=False`` is diffusion mode: attention sees the whole window and ``logits[:, t]``
        is the model's belief about the clean value of bit t itself (see bitlm.diffusion).
        ``telemetry=False`` skips K/C/S (an empty dict is returned): the decoding loop's fast path.
        ``decode=False`` (with a cache, ``arch="byte_patch"``) only advances the cache and returns
        ``(None, {})``: generation reads the next byte's distribution from the cache instead.
        """
        bits = _check_bits(bits)
        if not causal and cache is not None:
            raise ValueError("diffusion mode (causal=False) reads the whole window: it takes no KV cache")
        if cache is not None and cache.lengths is not None:
            raise ValueError("a cache of rows at different positions (bitlm.batching) is fed through decode_bytes")
        need_weights = self.config.full_attn_logging if return_attention is None else return_attention
        with self._autocast(bits):
            h, acts, atts = self._global(bits, cache, need_weights, causal, telemetry)
            if not decode and cache is not None and hasattr(self.io, "advance"):
                self.io.advance(h, cache)
                logits = None
            else:
                logits = self.io.logits(h, bits, cache, causal).float()  # (B, T, 2)
        offset = 0
        if cache is not None:
            cache.length += h.size(1)
            offset = cache.bits_seen
            cache.bits_seen += bits.size(1)
        if not telemetry or logits is None:
            return logits, {}
        cfg = self.config
        grad = (cfg.lambda_K > 0, cfg.lambda_C > 0, cfg.lambda_S > 0)
        return logits, {
            **logit_telemetry(logits, bits, offset, causal, grad, self.reference),
            "activations": acts,
            "attention_maps": atts,
        }

    @torch.no_grad()
    def denoise(self, bits: torch.Tensor) -> torch.Tensor:
        """Diffusion mode's belief about each clean byte of the noisy window ``bits`` (B, T),
        log q (B, ceil(T / 9), 256): what diffusion sampling draws whole bytes from. For
        ``arch="byte_patch"`` the local decoder's byte distribution (forward(causal=False)
        returns its bit marginals); for ``"bit"`` the product of the bits' marginals."""
        bits = _check_bits(bits)
        with self._autocast(bits):
            h = self._global(bits, None, False, False, False)[0]
            return self.io.denoise_log_q(h, bits).float()

    @torch.no_grad()
    def decode_bytes(self, values: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed whole bytes ``values`` (B, n) (ints 0..255) after the sequence ``cache`` holds
        (its first bytes go through forward) and return the distribution of the byte after
        each, log q (B, n, 256): generation's step for ``arch="byte_patch"``, equal to feeding
        their bits to ``forward(..., decode=False)`` and reading ``io.next_byte_log_probs(cache)``
        after each. The bytes go in as values (``io.embed_bytes``), skipping the per-bit checks
        and unpacking that a byte the caller drew does not need: with one byte per patch all n
        in one global step; with several, a byte at a time, the global step run only when a
        byte completes a patch. A cache of rows at different positions (bitlm.batching) takes
        one byte a row (n = 1)."""
        if cache.lengths is not None and values.size(1) != 1:
            raise ValueError(
                f"a cache of rows at different positions takes one byte a row a call, not {values.size(1)}"
            )
        if not hasattr(self.io, "embed_bytes"):
            raise ValueError(
                f"decode_bytes is arch='byte_patch''s decoding step; arch={self.config.arch!r} decodes bits"
            )
        if self.io.P != 1:
            if values.size(1) == 1:
                return self._decode_patch_byte(values, cache)[:, None]
            return torch.stack([self._decode_patch_byte(v[:, None], cache) for v in values.unbind(1)], 1)
        with self._autocast(values):
            x, start = self.io.embed_bytes(values, cache)
            h = self._blocks_from(x, start, cache, False, True, False)[0]
        self.io.advance(h, cache)
        log_q = self.io._byte_log_probs(h)  # as next_byte_log_probs reads it: outside autocast
        _count_positions(cache, h.size(1))
        cache.bits_seen += 9 * values.size(1)
        return log_q

    def _decode_patch_byte(self, value: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """decode_bytes for one byte (B, 1) with several bytes per patch: log q (B, 256)."""
        with self._autocast(value):
            x, start = self.io.embed_bytes(value, cache)
            if x.size(1):  # the byte completed a patch: one global step
                self.io.advance(self._blocks_from(x, start, cache, False, True, False)[0], cache)
                _count_positions(cache, 1)
        cache.bits_seen += 9
        return self.io.next_byte_log_probs(cache)

    def _autocast(self, bits: torch.Tensor):
        # use_autocast turns CPU bf16 on; off, it leaves a caller's autocast (amp) alone: a
        # nested autocast(enabled=False) would switch the caller's off.
        on_cpu = self.config.use_autocast and bits.device.type == "cpu"
        return torch.autocast("cpu", dtype=torch.bfloat16) if on_cpu else contextlib.nullcontext()

    def _global(self, bits: torch.Tensor, cache: KVCache | None, need_weights: bool, causal: bool, keep_acts: bool):
        """The global stack's outputs (B, positions, C) for ``bits`` (the cache's new ones),
        with the per-layer activations and attention maps."""
        x, start = self.io.embed(bits, cache, causal)  # (B, P, C), first position's index
        return self._blocks_from(x, start, cache, need_weights, causal, keep_acts)

    def _blocks_from(self, x: torch.Tensor, start, cache, need_weights: bool, causal: bool, keep_acts: bool):
        """The global stack on inputs ``x`` (B, positions, C) whose first position is ``start``
        (an int, or one per row (B,) for rows at different positions)."""
        last = (int(start.max()) if isinstance(start, torch.Tensor) else start) + x.size(1)
        if last > self.pos_emb.num_embeddings:
            raise ValueError(
                f"sequence needs {last} positions but max_seq_len allows "
                f"{self.pos_emb.num_embeddings}; use infer_long_sequence() or a larger max_seq_len"
            )
        if isinstance(start, torch.Tensor):  # rows at their own positions (B,)
            positions = start[:, None] + torch.arange(x.size(1), device=x.device)
        else:
            positions = torch.arange(start, start + x.size(1), device=x.device)
        x = apply_dropout(self.drop, x + self.pos_emb(positions))
        if not x.size(1):  # byte_patch: the new bits complete no patch, the local decoder alone answers
            return x, [], []
        h, acts, atts = self._run_blocks(x, cache, need_weights, causal, keep_acts)
        return self.ln_f(h), acts, atts

    def _run_blocks(
        self, x: torch.Tensor, cache: KVCache | None, need_weights: bool, causal: bool = True, keep_acts: bool = True
    ):
        acts: list[torch.Tensor] = []
        atts: list[torch.Tensor] = []
        if self.config.reversible and cache is None and not need_weights:
            return reversible_stack(self.blocks, x, causal), acts, atts
        ckpt = self.config.use_checkpoint and self.training and cache is None and not need_weights
        keep_acts = keep_acts and not (self.training and (self.config.reversible or self.config.use_checkpoint))
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


def _count_positions(cache: KVCache, n: int) -> None:
    """Count ``n`` new global positions in ``cache`` (one a row in a cache of rows at their
    own positions)."""
    if cache.lengths is not None and n:
        cache.lengths = cache.lengths + n  # a new tensor: the cache's mask of the step is stale
    cache.length += n


def _check_bits(bits: Any) -> torch.Tensor:
    if not isinstance(bits, torch.Tensor):
        bits = torch.as_tensor(bits)
    if bits.dim() == 1:
        bits = bits.unsqueeze(0)
    if bits.dim() != 2:
        raise ValueError(f"bits must have shape (batch, seq_len), got {tuple(bits.shape)}")
    if bits.dtype.is_floating_point or bits.dtype == torch.bool:
        bits = bits.long()
    if not torch.compiler.is_compiling() and bits.numel() and bool((bits & ~1).any()):  # one pass
        raise ValueError("bits must hold only 0 and 1")
    return bits.long()


def unwrap(model: nn.Module) -> nn.Module:
    """The BitTransformerLM inside DDP / torch.compile wrappers (FSDP2 shards in place)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def set_dropout(model: nn.Module, p: float, attention: float | None = None) -> None:
    """Set the probability of every dropout layer (and ``model.dropout`` in the config) to
    ``p``; with ``attention``, the attention-probability dropout too (``model.attn_dropout``,
    else left as it is: see its note in ModelConfig)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(m, BitTransformerLM):
            m.config.dropout = p
            if attention is not None:
                m.config.attn_dropout = attention
        if attention is not None and isinstance(m, CausalSelfAttention):
            m.dropout = attention


REFERENCE_KEY = "_reference.counts"  # the reference's counts, beside the weights


def save_pretrained(
    model: nn.Module,
    directory,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
):
    """Write ``model``'s config.json + model.safetensors to ``directory`` (bitlm.checkpoint).

    ``state_dict`` overrides the weights written, e.g. the gathered full state of a sharded
    model (bitlm.distributed.full_state_dict)."""
    model = unwrap(model)
    tensors = {**(model.state_dict() if state_dict is None else state_dict), REFERENCE_KEY: model.reference.counts}
    carried = {"trained_modes": sorted(model.trained_modes), "reference_bytes": model.reference.recorded_bytes}
    return write_checkpoint(directory, model.config, tensors, extra, carried)


def load_pretrained(directory, map_location: str | torch.device = "cpu") -> BitTransformerLM:
    """Build a BitTransformerLM from a checkpoint directory written by save_pretrained; a
    directory that is not one, or whose weights do not fit its config, raises CheckpointError."""
    config, weights, meta = read_checkpoint(directory, map_location)
    weights_path = f"{directory}/model.safetensors"
    model = BitTransformerLM(config=config)
    counts = weights.pop(REFERENCE_KEY, None)
    if counts is not None:
        model.reference = Reference(counts.cpu())
    # Checkpoints from before modes were recorded were trained causally.
    model.trained_modes = set(meta.get("carried", {}).get("trained_modes", ["causal"]))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match its config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights)
    return model.to(map_location)


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
    out = torch.empty(bits.size(0), T, 2, device=bits.device)
    start = 0
    while True:
        end = min(start + chunk, T)
        logits = model(bits[:, start:end])[0]
        keep_from = 0 if start == 0 else chunk - stride
        out[:, start + keep_from : end] = logits[:, keep_from:]
        if end == T:
            return out
        start += stride
