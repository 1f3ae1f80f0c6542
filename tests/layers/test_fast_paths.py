"""The CPU fast paths of layers/ (oneDNN Linear, fused StarReLU, in-place activations and residuals)
give the outputs and gradients of the plain formulas."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.layers import Linear, Scale, StarReLU, add_residual, apply_act
from formers.layers.linear import MIN_ROWS, _onednn_ok


@pytest.mark.parametrize("shape", [(2, 16, 16, 24), (3, 200, 24), (5, 24)])
def test_linear_matches_nn_linear_forward_and_backward(shape):
    torch.manual_seed(0)
    ref = nn.Linear(24, 40)
    fast = Linear(24, 40)
    fast.load_state_dict(ref.state_dict())  # same keys and shapes as nn.Linear
    x = torch.randn(*shape, requires_grad=True)
    # the oneDNN route is taken for the large inputs (not for the 5-row one)
    assert _onednn_ok(x, fast.weight) == (x.numel() >= MIN_ROWS * 24)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), fast(x2)
    assert y2.shape == y.shape and y2.is_contiguous()
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_linear_takes_aten_under_autocast_and_for_double():
    lin = Linear(8, 8)
    x = torch.randn(4, 300, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _onednn_ok(x, lin.weight)
        assert lin(x).dtype == torch.bfloat16
    assert not _onednn_ok(x.double(), lin.weight.double())


def test_starrelu_fused_gradients():
    act = StarReLU(0.8, -0.3).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(act, (x,))
    ref = act.scale * F.relu(x).square() + act.bias
    torch.testing.assert_close(act(x), ref)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), StarReLU(1.3, 0.2)])
def test_apply_act_in_place_without_autograd(act):
    x = torch.randn(2, 7, 9)
    ref = act(x)
    with torch.no_grad():
        y = x.clone()
        out = apply_act(act, y)
    assert out.data_ptr() == y.data_ptr()  # in place: no new buffer
    torch.testing.assert_close(out, ref)
    # with autograd on the input is left alone
    z = x.clone().requires_grad_()
    out = apply_act(act, z)
    assert out.data_ptr() != z.data_ptr()
    torch.testing.assert_close(z.detach(), x)


@pytest.mark.parametrize("scaled", [False, True])
def test_add_residual(scaled):
    torch.manual_seed(0)
    scale = Scale(6, 0.5) if scaled else None
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    ref = (x * scale.scale if scaled else x) + y
    torch.testing.assert_close(add_residual(x, y.clone(), scale), ref)
    with torch.no_grad():
        y2 = y.clone()
        out = add_residual(x, y2, scale)
    assert out.data_ptr() == y2.data_ptr()
    torch.testing.assert_close(out, ref)
    nchw = Scale(6, 0.5, channels_last=False)
    a, b = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(add_residual(a, b, nchw), a * 0.5 + b)


def test_fast_paths_trace_into_one_graph_under_torch_compile():
    """Under torch.compile the fast paths step aside (inductor fuses and packs on its own) without a
    graph break: a break would compile Linear.forward per shape and hit dynamo's recompile limit."""
    import torch._dynamo

    from formers.layers import Mlp

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp(16, 32, act_layer=StarReLU)
            self.gelu_mlp = Mlp(16, 32)
            self.scale = Scale(16)

        def forward(self, x):
            x = add_residual(x, self.mlp(x), self.scale)
            return add_residual(x, self.gelu_mlp(x))

    x = torch.randn(2, 300, 16)
    with torch.no_grad():
        explained = torch._dynamo.explain(Block())(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
