import pytest
import torch

from bitlm import BitTransformerLM, TrainConfig, Trainer, sample_text, text_to_bits
from bitlm.quantization import (
    Int4Linear,
    Int8DynamicLinear,
    QATLinear,
    convert_qat_fx,
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
