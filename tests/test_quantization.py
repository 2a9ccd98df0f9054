import pytest
import torch

from bitlm import BitTransformerLM, TrainConfig, Trainer, quantization, sample_text, text_to_bits
from bitlm.quantization import (
    Int4Linear,
    Int8DynamicLinear,
    QATLinear,
    convert_qat_fx,
    prepare_fused,
    prepare_qat_fx,
    quantize_dynamic,
    quantized_bytes,
)

TINY = dict(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, max_seq_len=144, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BitTransformerLM(**TINY).eval()


def _bits(n=2):
    stream = torch.tensor(text_to_bits("quantize the linear layers only. " * 6))
    return torch.stack([stream[9 * i : 9 * i + 144] for i in range(n)])


def test_int8_linear_matches_float_within_quantization_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = Int8DynamicLinear(lin)
    x = torch.randn(5, 7, 64)
    ref = lin(x)
    assert q(x).shape == ref.shape
    assert (q(x) - ref).abs().max() < 0.02 * ref.abs().max()
    assert q.weight_int8.dtype == torch.int8


def test_row_quantization_uses_the_whole_int8_range_and_no_more():
    """Each row's largest magnitude maps to 127 and the rest within it (no clamp is applied), for
    rows of every scale; rows under the scale's floor (zeros included) keep the floor's scale and
    quantize to 0; dequantized, every value is within half a step."""
    torch.manual_seed(0)
    rows = torch.randn(7, 64) * torch.tensor([0.0, 1e-12, 1e-6, 1.0, 3.3, 1e6, 1e30])[:, None]
    rows[3, 5] = -rows[3].abs().max() * 1.5  # a row whose extreme is negative
    q, s = quantization._quantize_rows(rows)
    wide = q.int()  # int8 abs(-128) is -128: compare in int32
    assert q.dtype == torch.int8 and wide.abs().max() <= 127
    assert torch.equal(wide[2:].abs().amax(1), torch.full((5,), 127, dtype=torch.int32))
    assert q[3, 5] == -127
    assert torch.equal(s[:2, 0], torch.full((2,), 1e-8) / 127) and not q[:2].any()  # the floor
    assert ((q.float() * s - rows).abs() <= 0.5 * s * (1 + 1e-5)).all()


def test_quantize_dynamic_keeps_outputs_and_telemetry(model):
    q = quantize_dynamic(model, dtype=torch.qint8)
    bits = _bits()
    (lf, tf), (lq, tq) = model(bits), q(bits)
    assert lq.shape == lf.shape and tq.keys() == tf.keys()
    assert (lq.softmax(-1) - lf.softmax(-1)).abs().max() < 0.02
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # the original is untouched
    assert quantized_bytes(q) < quantized_bytes(model)
    assert isinstance(sample_text(q, "int8", 4, seed=0), str)  # KV-cache generation works


def test_quantize_dynamic_refuses_other_dtypes(model):
    with pytest.raises(ValueError, match="qint8"):
        quantize_dynamic(model, dtype=torch.float16)


def test_qat_uses_4bit_weights_with_straight_through_gradients(model):
    qat = prepare_qat_fx(model)
    layer = qat.blocks[0].attn.qkv
    assert isinstance(layer, QATLinear)
    wq = layer.fake_quant_weight().detach()
    for row in wq.view(wq.size(0), -1, layer.group_size):  # 16 levels per group
        for group in row:
            assert group.unique().numel() <= 16
    qat.train()
    qat(_bits())[0].sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_qat_trains_and_converts_to_packed_4bit(model):
    qat = prepare_qat_fx(model)
    trainer = Trainer(qat, TrainConfig(lr=3e-3))
    losses = [trainer.train_step([_bits(4)])["loss"] for _ in range(10)]
    assert losses[-1] < losses[0]
    final = convert_qat_fx(qat.eval())
    assert all(not isinstance(m, (QATLinear, torch.nn.Linear)) or isinstance(m, Int4Linear) for m in final.modules())
    packed = final.blocks[0].mlp.fc
    assert isinstance(packed, Int4Linear) and packed.packed.dtype == torch.uint8
    assert packed.packed.numel() == packed.in_features * packed.out_features // 2
    bits = _bits()
    assert torch.allclose(final(bits)[0], qat.eval()(bits)[0], atol=1e-3)  # same function as trained


@pytest.mark.parametrize("M,K,N", [(1, 64, 96), (16, 64, 2), (17, 64, 96), (5, 60, 255), (40, 12, 3)])
def test_int8_product_within_cublas_limits_is_the_plain_product(monkeypatch, M, K, N):
    """On CUDA the int8 GEMM takes > 16 rows and K, N multiples of 8: the padded product the
    CUDA path runs is, on the CPU's kernel, exactly the unpadded one."""
    from bitlm import quantization

    torch.manual_seed(0)
    q = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-127, 128, (K, N), dtype=torch.int8)
    shapes, real = [], torch._int_mm

    def int_mm(a, b):
        shapes.append((*a.shape, b.size(1)))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", int_mm)
    out = quantization._int_mm(q, w, cublas=True)
    ((m, k, n),) = shapes
    assert m > 16 and k % 8 == 0 and n % 8 == 0  # what cuBLAS accepts
    assert out.dtype == torch.int32 and torch.equal(out, q.long().mm(w.long()).int())
    assert torch.equal(quantization._int_mm(q, w), out)  # the CPU path: the shape as it is


def test_int8_model_on_the_cublas_path_gives_the_cpu_answer(monkeypatch, model):
    from functools import partial

    from bitlm import quantization

    q = quantize_dynamic(model)
    bits = _bits()
    cpu = q(bits)[0]
    one_row = q(bits[:1, :9])[0]  # a decoding step's few rows
    monkeypatch.setattr(quantization, "_int_mm", partial(quantization._int_mm, cublas=True))
    assert torch.equal(q(bits)[0], cpu) and torch.equal(q(bits[:1, :9])[0], one_row)
    assert (cpu.softmax(-1) - model(bits)[0].softmax(-1)).abs().max() < 0.02  # int8 still tracks fp32


def test_fused_int8_passes_compile_once_and_serve_every_shape(model):
    """prepare_fused compiles the passes that inputs of 256 rows or more take (a Serve replica
    calls it as it starts); later inputs of other shapes, as inference makes them (no
    gradients or inference mode, (B, T, C) activations as rows), reuse them: no recompilation, no request waits."""
    from torch._dynamo.utils import counters

    prepare_fused("cpu")
    assert quantization._FUSED[("quantize", "cpu")] is not quantization._quantize_rows  # compiled, not eager
    q = quantize_dynamic(model)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for shape in ((2, 144), (3, 90), (5, 63)):  # 288, 270 and 315 rows
            bits = torch.randint(0, 2, shape)
            assert torch.allclose(q(bits)[0], model(bits)[0], atol=0.2)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as a use_autocast model calls them
            q(torch.randint(0, 2, (4, 72)))
    with torch.inference_mode():  # as decoding calls them (iter_generate, a Serve replica's loop)
        q(torch.randint(0, 2, (3, 99)))
    assert counters["stats"]["unique_graphs"] == graphs
