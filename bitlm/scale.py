"""Progressive scaling: grow a model without changing the function it computes.

``expand_model(model, strategy)`` returns a new, larger BitTransformerLM whose outputs equal the
original's at the moment of expansion:

- ``"depth"``: ``factor - 1`` times as many new blocks on top, each starting as the identity
  (its attention and MLP output projections are zero, so both residual branches add nothing,
  in the plain and in the reversible coupling alike).
- ``"width"``: d_model and dim_feedforward times ``factor`` by Net2Wider duplication. Every
  residual feature, hidden unit and attention-head dimension is copied ``factor`` times. Layers
  that write copies (embeddings, output projections, norms) repeat their rows; layers that read
  copies divide their weights by ``factor`` and add a zero-sum perturbation across the copies
  (+E on one, -E on the other), which cancels exactly because the copies are equal, yet gives
  each copy its own gradient so they can diverge. LayerNorm statistics over duplicated features
  are unchanged, which is why duplication rather than zero padding is used. Queries are scaled
  by 1/sqrt(factor) so attention logits keep their 1/sqrt(head_dim) temperature.
- ``"context"``: max_seq_len times ``factor``; new position embeddings repeat the old table, so
  positions keep their phase within a byte, and outputs on inputs that fit the old context are
  unchanged.

``expand_optimizer`` carries optimizer state over for every parameter whose name and shape
survive and starts the others fresh.

When to grow is one rule too, :class:`PlateauRule`, used by ``train_loop`` and by Tune's
progressive-scaling scheduler (tune/scaling.py) alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import torch
import torch.nn as nn

from .config import ModelConfig
from .model import BitTransformerLM, unwrap
from .optim import configure_optimizer
from .torch_utils import draw_device

STRATEGIES = ("depth", "width", "context")


def expand_model(
    model: BitTransformerLM,
    strategy: str = "depth",
    factor: int = 2,
    noise: float = 1e-2,
    generator: torch.Generator | None = None,
) -> BitTransformerLM:
    """A larger copy of ``model`` computing the same function (see the module docstring)."""
    model = unwrap(model)
    if factor < 2:
        raise ValueError(f"factor must be >= 2, got {factor}")
    if strategy == "depth":
        return _expand_depth(model, factor)
    if strategy == "width":
        return _expand_width(model, factor, noise, generator)
    if strategy == "context":
        return _expand_context(model, factor)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def _new_model(model: BitTransformerLM, **changes) -> BitTransformerLM:
    new = BitTransformerLM(config=replace(model.config, **changes))
    new.reference, new.trained_modes = model.reference, set(model.trained_modes)  # what it carries
    return new.to(next(model.parameters()).device)


def _expand_depth(model: BitTransformerLM, factor: int) -> BitTransformerLM:
    cfg = model.config
    new = _new_model(model, num_layers=cfg.num_layers * factor)
    missing, _ = new.load_state_dict(model.state_dict(), strict=False)
    assert all(k.startswith("blocks.") for k in missing)
    with torch.no_grad():
        for block in new.blocks[cfg.num_layers :]:
            for proj in (block.attn.proj, block.mlp.proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return new


def _expand_context(model: BitTransformerLM, factor: int) -> BitTransformerLM:
    new = _new_model(model, max_seq_len=model.config.max_seq_len * factor)
    state = model.state_dict()
    old = state["pos_emb.weight"]
    reps = -(-new.pos_emb.num_embeddings // old.size(0))
    state["pos_emb.weight"] = old.repeat(reps, 1)[: new.pos_emb.num_embeddings]
    new.load_state_dict(state)
    return new


# -- width --------------------------------------------------------------------------------------


class _Widener:
    """Index maps from new features to old ones, and the duplication rules that use them. The
    maps live on the model's device; the perturbation is drawn on the generator's (bitlm.torch_utils)."""

    def __init__(self, d: int, ff: int, nhead: int, factor: int, noise: float, generator, device: torch.device):
        self.factor, self.noise, self.generator, self.device = factor, noise, generator, device
        self.resid = torch.arange(d * factor, device=device) % d  # residual layout [x, x, ...]
        self.hidden = torch.arange(ff * factor, device=device) % ff
        D = d // nhead
        j = torch.arange(d * factor, device=device)
        self.heads = (j // (D * factor)) * D + (j % (D * factor)) % D  # per head [h, h, ...]

    def copies(self, n: int, factor: int = 1) -> torch.Tensor:
        """The map of ``n`` features to ``n * factor`` copies (1: the identity)."""
        return torch.arange(n * factor, device=self.device) % n

    def rows(self, w: torch.Tensor, out_map: torch.Tensor) -> torch.Tensor:
        """Repeat output rows (writers of duplicated features)."""
        return w[out_map]

    def cols(self, w: torch.Tensor, in_map: torch.Tensor) -> torch.Tensor:
        """Read duplicated inputs: weights / factor plus a perturbation summing to zero across
        the copies of each input feature."""
        out = w[:, in_map] / self.factor
        if self.noise:
            n_old = int(in_map.max()) + 1
            std = float(w.std()) if w.numel() > 1 else 1.0
            where = draw_device(self.generator, w.device)
            e = torch.randn(w.size(0), n_old, generator=self.generator, device=where).to(w) * (self.noise * std)
            copy_index = _copy_number(in_map)
            sign = torch.where(copy_index % 2 == 0, 1.0, -1.0).to(w)
            paired = (copy_index < (self.factor // 2) * 2).to(w)  # an odd last copy gets no noise
            out = out + e[:, in_map] * sign * paired
        return out

    def linear(self, lin: nn.Linear, out_map: torch.Tensor, in_map: torch.Tensor, out_scale=None) -> dict:
        w = self.cols(self.rows(lin.weight.detach(), out_map), in_map)
        b = self.rows(lin.bias.detach(), out_map) if lin.bias is not None else None
        if out_scale is not None:
            out_scale = out_scale.to(w)
            w, b = w * out_scale[:, None], (b * out_scale if b is not None else None)
        return {"weight": w, "bias": b}


def _copy_number(in_map: torch.Tensor) -> torch.Tensor:
    """For each new feature, which copy of its old feature it is (0, 1, ...), in index order."""
    order = torch.argsort(in_map, stable=True)
    sorted_map = in_map[order]
    first = torch.searchsorted(sorted_map, sorted_map)  # index of the first copy of each value
    number = torch.empty_like(in_map)
    number[order] = torch.arange(in_map.numel(), device=in_map.device) - first
    return number


def _expand_width(model: BitTransformerLM, factor: int, noise: float, generator) -> BitTransformerLM:
    cfg = model.config
    new = _new_model(model, d_model=cfg.d_model * factor, dim_feedforward=cfg.dim_feedforward * factor)
    device = next(model.parameters()).device
    wd = _Widener(cfg.d_model, cfg.dim_feedforward, cfg.nhead, factor, noise, generator, device)
    d = cfg.d_model
    state: dict[str, torch.Tensor] = {}
    old = model.state_dict()

    def put(prefix: str, params: dict) -> None:
        for k, v in params.items():
            if v is not None:
                state[f"{prefix}.{k}"] = v

    for name, tensor in old.items():
        if name.endswith("_emb.weight") or name == "pos_emb.weight":  # embeddings write the stream
            state[name] = tensor[:, wd.resid]
        elif name.endswith("mode_emb"):  # one vector added to the stream
            state[name] = tensor[wd.resid]
        elif ".ln" in name or name.startswith("ln_f"):  # norms: per residual feature
            state[name] = tensor[wd.resid]
    qkv_out = torch.cat([wd.heads + i * d for i in range(3)])  # q, k, v blocks, each per head
    q_scale = torch.ones(3 * d * factor, device=device)
    q_scale[: d * factor] = factor**-0.5
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        put(f"{p}.attn.qkv", wd.linear(block.attn.qkv, qkv_out, wd.resid, q_scale))
        put(f"{p}.attn.proj", wd.linear(block.attn.proj, wd.resid, wd.heads))
        put(f"{p}.mlp.fc", wd.linear(block.mlp.fc, wd.hidden, wd.resid))
        put(f"{p}.mlp.proj", wd.linear(block.mlp.proj, wd.resid, wd.hidden))
    for name, module in model.io.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name.endswith("_fc"):  # an MLP's first layer: hidden units are duplicated too
            put(f"io.{name}", wd.linear(module, wd.copies(module.out_features, factor), wd.resid))
        elif name.endswith("_proj"):  # an MLP's second layer writes the stream
            put(f"io.{name}", wd.linear(module, wd.resid, wd.copies(module.in_features, factor)))
        else:  # output heads read the stream
            put(f"io.{name}", wd.linear(module, wd.copies(module.out_features), wd.resid))
    missing = sorted(set(new.state_dict()) - set(state))
    if missing:
        raise NotImplementedError(f"width expansion does not know how to widen {missing}")
    new.load_state_dict(state)
    return new


# -- optimizer ----------------------------------------------------------------------------------


def expand_optimizer(
    optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module
) -> torch.optim.Optimizer:
    """An optimizer of the same kind and settings for ``new_model``, carrying the state of every
    parameter whose name and shape are unchanged; new or reshaped parameters start fresh."""
    groups = optimizer.param_groups
    new_opt = configure_optimizer(
        new_model,
        lr=groups[0]["lr"],
        weight_decay=groups[0]["weight_decay"],
        betas=groups[0].get("betas", (0.9, 0.95)),
        fused=bool(groups[0].get("fused")),
    )
    old_params = dict(old_model.named_parameters())
    for name, p in new_model.named_parameters():
        q = old_params.get(name)
        if q is not None and q.shape == p.shape and q in optimizer.state:
            new_opt.state[p] = copy.deepcopy(optimizer.state[q])
    return new_opt


def grow_to(
    model: BitTransformerLM, target, generator: torch.Generator | None = None
) -> tuple[BitTransformerLM, list[str]]:
    """Grow ``model`` by doubling expansions until its config equals ``target`` (a
    ModelConfig); return the grown model and the strategies applied, in order. A target that
    no sequence of depth/width/context doublings reaches raises ValueError."""
    steps = []
    fields = {"depth": "num_layers", "width": "d_model", "context": "max_seq_len"}
    target = target.resolved()  # a model's config is resolved; so must the target be
    check_only_size_differs(model.config, target)
    while True:
        cur = model.config
        if asdict(cur) == asdict(target):
            return model, steps
        for strategy, name in fields.items():
            if getattr(target, name) >= 2 * getattr(cur, name):
                model = expand_model(model, strategy, generator=generator)
                steps.append(strategy)
                break
        else:
            raise ValueError(f"cannot grow {asdict(cur)} into {asdict(target)} by doubling depth, width or context")


def check_only_size_differs(current, target) -> None:
    """Refuse, naming them, the settings other than size (SIZE_FIELDS) in which two model
    configs differ: no growth changes them (a checkpoint from before a setting existed loads
    as it was, and a config that has the setting cannot grow it)."""
    sized = {name for names in SIZE_FIELDS.values() for name in names}
    a, b = asdict(current.resolved()), asdict(target.resolved())
    fixed = [f"model.{k} ({a[k]!r} -> {b[k]!r})" for k in a if k not in sized and a[k] != b[k]]
    if fixed:
        raise ValueError(
            f"growing changes a model's size only; it differs in {', '.join(fixed)}: set them as the model has them"
        )


# -- when to grow -------------------------------------------------------------------------------

SIZE_FIELDS = {"depth": ("num_layers",), "width": ("d_model", "dim_feedforward"), "context": ("max_seq_len",)}


def grown_config(config: ModelConfig, strategy: str, factor: int = 2) -> ModelConfig:
    """The config ``expand_model(model, strategy, factor)`` gives a model of ``config``."""
    return replace(config, **{name: getattr(config, name) * factor for name in SIZE_FIELDS[strategy]})


def count_parameters(config: ModelConfig) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return BitTransformerLM(config=config).num_parameters()


class PlateauRule:
    """Grow on a plateau: a score (validation loss or bits/byte) that has not improved by
    ``min_delta`` on the best so far for ``patience`` observations in a row.

    ``observe(score, config, growths)`` records one score of a model of ``config`` that has
    grown ``growths`` times so far, and returns the strategy to grow by now, or None. Strategies
    cycle through ``strategies`` in order. A growth past ``max_params`` is never made, and once
    one is refused the rule stops growing (a bigger model would be refused again). After a
    growth the best score starts over: the grown model is judged on its own progress.
    """

    def __init__(
        self,
        patience: int,
        min_delta: float = 0.0,
        strategies: Sequence[str] = STRATEGIES,
        max_params: int | None = None,
        mode: str = "min",
    ):
        bad = [s for s in strategies if s not in STRATEGIES]
        if patience < 1 or bad or mode not in ("min", "max"):
            raise ValueError(f"PlateauRule needs patience >= 1, strategies in {STRATEGIES}, mode min|max")
        self.patience, self.min_delta, self.strategies = patience, min_delta, list(strategies)
        self.max_params, self.sign = max_params, 1 if mode == "min" else -1
        self.best, self.bad, self.capped = math.inf, 0, False

    def observe(
        self, score: float, config: ModelConfig, growths: int, size: Callable[[ModelConfig], int] = count_parameters
    ) -> str | None:
        value = self.sign * score
        if value < self.best - self.min_delta:
            self.best, self.bad = value, 0
            return None
        self.bad += 1
        if self.bad < self.patience or self.capped or not self.strategies:
            return None
        strategy = self.strategies[growths % len(self.strategies)]
        if self.max_params is not None and size(grown_config(config, strategy)) > self.max_params:
            self.capped = True
            return None
        self.best, self.bad = math.inf, 0
        return strategy
