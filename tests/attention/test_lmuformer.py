"""LMU token mixer: the zero-order-hold discretisation (against scipy), the impulse response, the
parallel (FFT) form against the recurrence, the Legendre delay property, the spiking variant
(binary spikes, surrogate gradients), causality and padding."""
import math

import pytest
import torch

from formers.attention import build_attention
from formers.attention.lmuformer import impulse_response, lif, lmu_state_space, zoh_discretize


def test_state_space_and_zoh_discretisation():
    a, b = lmu_state_space(6, 10.0)
    assert a[0].tolist() == pytest.approx([-0.1] * 6)                 # row 0: i <= j -> -1, times 1/theta
    assert a[3, 1] == pytest.approx(7 / 10 * (-1) ** 3) and a[3, 2] == pytest.approx(7 / 10)
    assert b[:, 0].tolist() == pytest.approx([(2 * i + 1) / 10 * (-1) ** i for i in range(6)])
    ad, bd = zoh_discretize(a, b)
    assert torch.allclose(bd, torch.linalg.solve(a, (ad - torch.eye(6, dtype=a.dtype)) @ b), atol=1e-13)
    try:
        import scipy.linalg
        import scipy.signal
    except ImportError:                                                  # a truncated series instead
        ref = sum(torch.linalg.matrix_power(a, k) / math.factorial(k) for k in range(40))
        assert torch.allclose(ad, ref, atol=1e-12)
        return
    assert torch.allclose(ad, torch.from_numpy(scipy.linalg.expm(a.numpy())), atol=1e-13)
    a12, b12 = lmu_state_space(12, 64.0)
    ad12, bd12 = zoh_discretize(a12, b12)
    sys = scipy.signal.cont2discrete((a12.numpy(), b12.numpy(), torch.ones(1, 12).numpy(), [[0.0]]),
                                     dt=1.0, method="zoh")
    assert torch.allclose(ad12, torch.from_numpy(sys[0]), atol=1e-13)
    assert torch.allclose(bd12, torch.from_numpy(sys[1]), atol=1e-13)


def test_impulse_response_by_doubling_is_the_matrix_powers():
    ad, bd = zoh_discretize(*lmu_state_space(5, 8.0))
    h = impulse_response(ad, bd, 37)
    ref = torch.stack([(torch.linalg.matrix_power(ad, k) @ bd)[:, 0] for k in range(37)])
    assert h.shape == (37, 5) and torch.allclose(h, ref, atol=1e-13)


def test_memory_reconstructs_the_delayed_input_in_legendre_coordinates():
    """u(t - r theta) ~ sum_i P~_i(r) m_i(t), P~_i the shifted Legendre polynomials (d=12, theta=64)."""
    att = build_attention("lmu", dim=8, num_heads=1, max_len=400, memory_size=12, theta=64).double()
    t = torch.arange(400, dtype=torch.float64)
    u = torch.sin(2 * math.pi * t / 100) + 0.5 * torch.cos(2 * math.pi * t / 77)
    m = att.memory(u[None])[0]

    def legendre(i, r):
        return (-1) ** i * sum(math.comb(i, j) * math.comb(i + j, j) * (-r) ** j for j in range(i + 1))

    for r in (0.0, 0.5, 1.0):
        rec = sum(legendre(i, r) * m[:, i] for i in range(12))
        lag = int(r * 64)
        assert (rec[200:] - u[200 - lag:400 - lag]).abs().max() < 0.08, r


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_parallel_fft_form_equals_recurrent_form(dtype, tol):
    torch.manual_seed(0)
    att = build_attention("lmu", dim=16, num_heads=2, max_len=64).to(dtype).eval()
    u = torch.randn(3, 60, dtype=dtype)
    mp, mr = att.memory(u, "parallel"), att.memory(u, "recurrent")
    assert (mp - mr).abs().max() <= tol * max(1.0, mr.abs().max().item())
    x = torch.randn(3, 60, 16, dtype=dtype)
    assert torch.allclose(att(x), att(x, mode="recurrent"), atol=tol, rtol=0)
    rec = build_attention("lmu", dim=16, num_heads=2, max_len=64, mode="recurrent").to(dtype).eval()
    rec.load_state_dict(att.state_dict())
    assert torch.allclose(rec(x), att(x), atol=tol, rtol=0)


def test_spiking_variant_binary_spikes_and_gradients():
    torch.manual_seed(0)
    att = build_attention("lmu", dim=16, num_heads=2, max_len=64, spiking=True).double().train()
    assert att.memory_size == 32                                         # official SLMU: 2 dim
    x = (3 * torch.randn(4, 30, 16, dtype=torch.float64)).requires_grad_()
    y = att(x)
    assert set(y.unique().tolist()) == {0.0, 1.0}                       # binary spikes, some of each
    y.sum().backward()
    for p in (x, att.w_u.weight, att.w_h.weight, att.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # both forms give the same spikes (fp64)
    assert torch.equal(att(x), att(x, mode="recurrent"))


def test_lif_neuron_by_hand():
    x = torch.tensor([[[1.5], [1.5], [0.5], [3.0]]])
    # v: 0.75 (no spike), 0.75 + 0.375 = 1.125 (spike, reset 0), 0.25, 0.25 + 1.375 = 1.625 (spike)
    assert lif(x)[0, :, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    mask = torch.tensor([[True, False, True, True]])                     # a padded step keeps the state
    assert lif(x, mask)[0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("spiking", [False, True])
def test_causal_and_padding_appended_at_the_end(spiking):
    torch.manual_seed(0)
    att = build_attention("lmu", dim=16, num_heads=2, max_len=64, spiking=spiking).double()
    x = 3 * torch.randn(2, 20, 16, dtype=torch.float64)
    xp = torch.cat([x, torch.randn(2, 9, 16, dtype=torch.float64)], 1)
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[:, 20:] = False
    for train in (True, False):                                          # batch statistics over real tokens
        att.train(train)
        assert torch.allclose(att(xp, mask)[:, :20], att(x), atol=1e-12)
    att.eval()                                                           # eval: the future never matters
    assert torch.allclose(att(xp)[:, :20], att(x), atol=1e-12)
    noncausal = build_attention("lmu", dim=16, num_heads=2, max_len=64, spiking=spiking, causal=False).double()
    noncausal.load_state_dict(att.state_dict())
    assert torch.allclose(noncausal.eval()(xp)[:, :20], att(x), atol=1e-12)


def test_bad_mode():
    with pytest.raises(ValueError, match="lmu"):
        build_attention("lmu", dim=16, num_heads=2, max_len=8, mode="chunkwise")


def test_ann_cell_formula():
    """h = ReLU(W_h [m; x]) with the memory used as it is (no activation on m), then 1x1 proj + BN."""
    torch.manual_seed(0)
    att = build_attention("lmu", dim=16, num_heads=2, max_len=64).double().eval()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    u = torch.relu(att.w_u(x))[..., 0]
    m = att.memory(u)
    assert (m < 0).any()                                     # a ReLU on m would change these
    h = torch.relu(att.w_h(torch.cat([m, x], -1)))
    assert torch.allclose(att(x), att.proj_bn(att.proj(h)), atol=1e-12)
