"""Quantization: int8 dynamic quantization for inference, and 4-bit quantization-aware training.

Both are small module swaps written here rather than taken from ``torch.ao.quantization``
(deprecated in this torch) or torchao. torchao's int8 dynamic path on CPU comes down to the
same int8 GEMM used here (``torch._int_mm``), and its 4-bit paths target GPU kernels; a
dependency pinned to torch's release train would buy nothing on this project's CPU path, while
these ~150 lines keep every formula visible. Only ``nn.Linear`` layers are quantized
(attention, MLP and output heads); embeddings and norms stay fp32.

int8 dynamic (``quantize_dynamic``): weights are stored as int8 with one scale per output
channel, ``s_w = max|W_row| / 127``; each input row is quantized on the fly with
``s_x = max|x_row| / 127``; then ``y = (q_x @ q_w^T) * s_x * s_w + b`` with an int8 x int8 ->
int32 matrix product. On CUDA that product is cuBLAS's, which takes more than 16 rows and
inner and output sizes that are multiples of 8: smaller operands are padded with zeros, which
add nothing to the products kept (``_int_mm``).

4-bit QAT (``prepare_qat_fx`` / ``convert_qat_fx``): weights are fake-quantized in groups of
``group_size`` input features to the 16 levels -8..7 with ``s = max|W_group| / 7.5``, rounding
with a straight-through estimator (the forward pass sees the quantized weight, the gradient
flows to the fp32 weight as if rounding were the identity). Converting packs two 4-bit codes
per byte (uint8) plus fp16 group scales: 4.25 bits per weight for group 64 instead of 32.
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import unwrap


def _swap_linears(model: nn.Module, make) -> nn.Module:
    for name, child in model.named_children():
        if type(child) is nn.Linear or isinstance(child, QATLinear):
            setattr(model, name, make(child))
        else:
            _swap_linears(child, make)
    return model


# -- int8 dynamic ----------------------------------------------------------------------------


# A decoding step quantizes single rows through ~20 Linears, where each elementwise op's fixed
# cost (microseconds) is most of the time: both passes below take as few ops as the formulas
# allow (benchmarks/serve_bench.py measures int8 against fp32 at one request).


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.linalg.vector_norm(x, float("inf"), 1, keepdim=True).clamp_min(1e-8) / 127  # max|x_row| / 127
    # |x / s| <= 127 by construction (up to fp32 rounding, well below 127.5), so no clamp is
    # needed; fp32 only (Int8DynamicLinear passes .float()): in bf16 it could round to 128
    return torch.round(x / s).to(torch.int8), s


def _dequantize(y: torch.Tensor, s: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scale = s * w_scale
    return y.float() * scale if bias is None else torch.addcmul(bias, y.float(), scale)


_CUBLAS_MIN_ROWS = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"


def _int_mm(q: torch.Tensor, w: torch.Tensor, cublas: bool | None = None) -> torch.Tensor:
    """``q`` (M, K) int8 @ ``w`` (K, N) int8 -> (M, N) int32, exactly, for any M, K, N.

    ``cublas`` (default: on CUDA) keeps to cuBLAS's int8 GEMM limits: fewer than 17 rows get
    zero rows (one decoding step has one), and K and N are padded to multiples of 8 with zero
    columns of ``q`` and zero rows and columns of ``w`` (an output head has N = 2); the padded
    products are sliced off. The CPU kernel takes any shape as it is."""
    if not (q.is_cuda if cublas is None else cublas):
        return torch._int_mm(q, w)
    (M, K), N = q.shape, w.size(1)
    pad_k, pad_n = -K % 8, -N % 8
    if pad_k or pad_n:
        w = F.pad(w, (0, pad_n, 0, pad_k))
    if pad_k or M < _CUBLAS_MIN_ROWS:
        q = F.pad(q, (0, pad_k, 0, max(0, _CUBLAS_MIN_ROWS - M)))
    return torch._int_mm(q, w)[:M, :N].contiguous()


# Large inputs (prefill, evaluation, batched serving) spend more time in the elementwise
# quantize/dequantize passes than in the int8 GEMM unless they are fused into one pass each;
# torch.compile does that. Single rows (one decoding step) stay eager: there the fused
# kernels' call overhead is the larger cost.
_FUSE_MIN_ROWS = 256
_FUSED: dict[tuple[str, str], object] = {}
_FUSED_LOCK = threading.Lock()  # one compilation per pass: a second caller waits for it


def prepare_fused(device: torch.device | str = "cpu") -> None:
    """Compile the fused int8 passes for ``device`` now (seconds, once per process) rather than
    in the first input of 256 rows or more: a Serve replica starts it as it loads."""
    for name in ("quantize", "dequantize"):
        _fused(name, torch.device(device))


def _fused(name: str, device: torch.device):
    """The compiled pass ``name`` for ``device``'s type, tried there once (a machine may
    compile for one device type and not the other); eager where compiling fails."""
    key = (name, device.type)
    if key in _FUSED:
        return _FUSED[key]
    with _FUSED_LOCK:
        return _FUSED[key] if key in _FUSED else _compile(name, device)


def _compile(name: str, device: torch.device):
    fn = _quantize_rows if name == "quantize" else _dequantize
    try:
        compiled = torch.compile(fn, dynamic=True)
        # Compiled here, not in the first request that needs it (seconds): as it is called
        # (without gradients, on tensors that are no views) at two shapes, the second of which
        # makes the sizes symbolic, so that later shapes reuse the kernels; in both modes that
        # call it, which compile apart: evaluation's no_grad, and decoding's inference_mode
        # (activations made in it, the layer's scale and bias not).
        for mode in (torch.no_grad, torch.inference_mode):
            for n, k in ((_FUSE_MIN_ROWS, 8), (_FUSE_MIN_ROWS + 1, 24)):
                scale, bias = torch.ones(k, device=device), torch.ones(k, device=device)
                with mode(), torch.autocast(device.type, enabled=False):
                    if name == "quantize":
                        compiled(torch.ones(n, k, device=device))
                    else:
                        rows = torch.ones(n, 1, device=device)
                        compiled(torch.ones(n, k, dtype=torch.int32, device=device), rows, scale, bias)
    except Exception:  # noqa: BLE001 - no compiler here: stay eager
        compiled = fn
    _FUSED[(name, device.type)] = compiled  # published once ready: the unlocked read sees it whole
    return compiled


class Int8DynamicLinear(nn.Module):
    """A Linear with int8 per-channel weights and per-row dynamically quantized int8 inputs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        self.register_buffer(
            "weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()
        )
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.size(0) >= _FUSE_MIN_ROWS:
            # As the passes were compiled (prepare_fused): no autocast, inputs that are no views
            # (detached); anything else would recompile them inside the call.
            with torch.autocast(x2.device.type, enabled=False):
                q, s = _fused("quantize", x2.device)(x2.detach())
                y = _int_mm(q, self.weight_int8).detach()
                y = _fused("dequantize", x2.device)(y, s, self.weight_scale, self.bias)
        else:
            q, s = _quantize_rows(x2)
            y = _dequantize(_int_mm(q, self.weight_int8), s, self.weight_scale, self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_dynamic(model: nn.Module, dtype: torch.dtype = torch.qint8) -> nn.Module:
    """An inference copy of ``model`` with every Linear as int8 (see the module docstring).

    Same call, outputs and telemetry as the float model; the copy is in eval mode. ``dtype``
    must be ``torch.qint8`` (or ``torch.int8``), the only precision offered.
    """
    if dtype not in (torch.qint8, torch.int8):
        raise ValueError(f"quantize_dynamic supports dtype=torch.qint8 only, got {dtype}")
    q = copy.deepcopy(unwrap(model)).eval()
    return _swap_linears(q, lambda lin: Int8DynamicLinear(_as_float_linear(lin)))


# -- 4-bit QAT --------------------------------------------------------------------------------


def _group_scales(w: torch.Tensor, group: int) -> torch.Tensor:
    """Scale per (row, group): max |w| / 7.5, as a (out, in) tensor repeated over each group."""
    out, n = w.shape
    g = w.reshape(out, n // group, group)
    return (g.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7.5).expand_as(g).reshape(out, n)


def _quantize4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes in -8..7 and their scales for ``w``."""
    s = _group_scales(w, group)
    return torch.round(w / s).clamp(-8, 7), s


class QATLinear(nn.Linear):
    """A Linear trained with 4-bit fake-quantized weights (straight-through rounding)."""

    group_size: int = 64

    def fake_quant_weight(self) -> torch.Tensor:
        codes, s = _quantize4(self.weight, self.group_size)
        wq = codes * s
        return self.weight + (wq - self.weight).detach()  # straight-through estimator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), self.bias)


class Int4Linear(nn.Module):
    """A Linear whose weights are stored packed, two 4-bit codes per byte, with fp16 scales."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        w = linear.weight.detach().float()
        codes, s = _quantize4(w, group_size)
        u = (codes + 8).to(torch.uint8).reshape(-1)  # 0..15
        u = torch.cat([u, u.new_zeros(u.numel() % 2)])
        self.register_buffer("packed", u[0::2] | (u[1::2] << 4))
        self.register_buffer("scales", s[:, ::group_size].to(torch.float16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def weight(self) -> torch.Tensor:
        """The dequantized fp32 weight (out, in)."""
        codes = torch.stack([self.packed & 0xF, self.packed >> 4], dim=1).reshape(-1)
        n = self.out_features * self.in_features
        w = codes[:n].float().sub_(8).view(self.out_features, -1, self.group_size)
        return (w * self.scales.float()[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"


def _group_for(linear: nn.Linear, group_size: int) -> int:
    return group_size if linear.in_features % group_size == 0 else linear.in_features


def _as_float_linear(linear: nn.Linear) -> nn.Linear:
    """A plain Linear with ``linear``'s effective weights (QAT layers give their quantized ones)."""
    if isinstance(linear, QATLinear):
        out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            out.weight.copy_(linear.fake_quant_weight())
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out
    return linear


def prepare_qat_fx(model: nn.Module, group_size: int = 64) -> nn.Module:
    """A trainable copy of ``model`` whose Linear layers fake-quantize their weights to 4 bits."""
    q = copy.deepcopy(unwrap(model))

    def make(lin: nn.Linear) -> QATLinear:
        new = QATLinear(lin.in_features, lin.out_features, bias=lin.bias is not None).to(lin.weight.device)
        new.group_size = _group_for(lin, group_size)
        new.load_state_dict(lin.state_dict())
        return new

    return _swap_linears(q, make)


def convert_qat_fx(qat_model: nn.Module) -> nn.Module:
    """An inference copy of a QAT model with real packed 4-bit weights (see Int4Linear)."""
    q = copy.deepcopy(qat_model).eval()

    def make(lin: nn.Linear) -> Int4Linear:
        group = lin.group_size if isinstance(lin, QATLinear) else _group_for(lin, 64)
        return Int4Linear(lin, group)

    return _swap_linears(q, make)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (to compare fp32 / int8 / int4)."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
