import pytest
import torch

from bitlm import BitTransformerLM, TrainConfig, Trainer
from bitlm.reversible import coupled_stack, reversible_stack

CFG = dict(d_model=32, nhead=4, num_layers=3, dim_feedforward=64, max_seq_len=90)


def _grads(model, fn, x):
    model.zero_grad()
    out = fn(model.blocks, x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad.clone(), [p.grad.clone() for p in model.blocks.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_gradients_match_stored_activation_coupling(dropout):
    torch.manual_seed(0)
    model = BitTransformerLM(**CFG, dropout=dropout, reversible=True).train()
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    model.double()
    torch.manual_seed(1)
    out_r, dx_r, g_r = _grads(model, reversible_stack, x)
    x.grad = None
    torch.manual_seed(1)  # same dropout masks
    out_c, dx_c, g_c = _grads(model, coupled_stack, x)
    assert torch.allclose(out_r, out_c, atol=1e-10)
    assert torch.allclose(dx_r, dx_c, atol=1e-8)
    for a, b in zip(g_r, g_c):
        assert torch.allclose(a, b, atol=1e-8)


def test_reversible_stack_passes_gradcheck():
    torch.manual_seed(0)
    model = BitTransformerLM(**dict(CFG, num_layers=2, d_model=8, nhead=2, dim_feedforward=16), dropout=0.0).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reversible_stack(model.blocks, t), (x,), atol=1e-6)


def test_reversible_model_forward_equals_its_incremental_path():
    torch.manual_seed(0)
    model = BitTransformerLM(**CFG, dropout=0.0, reversible=True).eval()
    bits = torch.randint(0, 2, (2, 90))
    with torch.enable_grad():
        full = model(bits)[0]  # reversible stack (grad enabled)
    cache = model.new_cache()
    inc = torch.cat([model(bits[:, :45], cache)[0], model(bits[:, 45:], cache)[0]], 1)
    assert torch.allclose(full, inc, atol=1e-5)


@pytest.mark.parametrize("option", ["reversible", "use_checkpoint"])
def test_memory_options_train_like_the_standard_model(option):
    from bitlm import text_to_bits

    stream = torch.tensor(text_to_bits("reversible blocks recompute. " * 8))
    bits = torch.stack([stream[9 * i : 9 * i + 90] for i in range(8)])
    losses = {}
    for name, kw in (("standard", {}), (option, {option: True})):
        torch.manual_seed(0)
        model = BitTransformerLM(**CFG, dropout=0.0, **kw)
        trainer = Trainer(model, TrainConfig(lr=3e-3))
        losses[name] = [trainer.train_step([bits])["loss"] for _ in range(10)]
    if option == "use_checkpoint":  # same function, recomputed: identical training
        assert losses["standard"] == pytest.approx(losses[option], abs=1e-5)
    else:  # a different (coupled) function, but it trains
        assert losses[option][-1] < 0.8 * losses[option][0]
