"""bitlm.torch_utils.gelu: the GELU of every bitlm model, F.gelu's function on ATen's own kernel
for the small CPU tensors of decoding (oneDNN's fixed cost is paid per call, however small)."""

import pytest
import torch
import torch.nn.functional as F

from bitlm.torch_utils import ONEDNN_GELU_MIN, gelu


def _aten_gelu(x: torch.Tensor) -> torch.Tensor:
    """F.gelu with oneDNN switched off: ATen's own kernel (test-only: the switch is global)."""
    with torch.backends.mkldnn.flags(enabled=False):
        return F.gelu(x)


@pytest.mark.parametrize(
    "shape", [(1, 256), (3, 1, 512), (16, 256), (2, 3, 8), (5, 9), (7,), (1, 1), (), (0, 4), (4, 64, 512)]
)
def test_gelu_is_f_gelu_in_values_and_gradients(shape):
    """Same shape, contiguous, and F.gelu's values and gradients (within float32 rounding) for
    sizes on either side of the oneDNN threshold, odd last dimensions, a single element, a
    scalar, an empty tensor and a transposed (non-contiguous) input."""
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).requires_grad_()
    y, ref = gelu(x), F.gelu(x)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6)
    g = torch.randn_like(ref)
    (gx,), (gref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gref, rtol=0, atol=2e-6)
    t = x.detach().mT if x.dim() > 1 else x.detach()
    torch.testing.assert_close(gelu(t), F.gelu(t), rtol=0, atol=2e-6)


def test_small_cpu_tensors_take_atens_kernel_and_large_ones_onednns():
    """Below the threshold gelu gives exactly ATen's own kernel's values, which differ in the
    last bits from oneDNN's (so this fails if gelu falls back to plain F.gelu); from the
    threshold on, exactly F.gelu's (oneDNN's, at training's sizes)."""
    torch.manual_seed(0)
    small = 3 * torch.randn(16, 256)
    # the pinned CPU build of torch (constraints.txt) sends F.gelu to oneDNN, whose values differ
    assert not torch.equal(F.gelu(small), _aten_gelu(small))
    assert torch.equal(gelu(small), _aten_gelu(small))
    large = 3 * torch.randn(ONEDNN_GELU_MIN // 256, 256)
    assert torch.equal(gelu(large), F.gelu(large))
