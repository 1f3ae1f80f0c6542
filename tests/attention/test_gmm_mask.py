"""Gaussian-mixture mask attention: the neutral mask of each mode is vanilla softmax attention, the
mask against a hand computation (1-D and the 2-D grid with a CLS token), both modes against their
explicit formulas, padding and causality."""
import math

import pytest
import torch

from formers.attention import build_attention

DIM, HEADS, N = 24, 3, 26


def _pair(mode, causal=False, **kw):
    torch.manual_seed(0)
    ref = build_attention("softmax", dim=DIM, num_heads=HEADS, max_len=64, causal=causal).double()
    gmm = build_attention("gmm_mask", dim=DIM, num_heads=HEADS, max_len=64, causal=causal, mode=mode, **kw).double()
    gmm.load_state_dict(ref.state_dict(), strict=False)
    return ref, gmm


@pytest.mark.parametrize("causal", [False, True])
def test_neutral_masks_give_vanilla_attention(causal):
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    real = torch.ones(2, N, dtype=torch.bool)
    real[1, 18:] = False
    ref, mul = _pair("multiply", causal)
    with torch.no_grad():                     # one kernel of weight 1 and infinite width: G = 1 exactly
        mul.alpha.zero_()
        mul.alpha[0] = 1.0
        mul.sigma.fill_(math.inf)
    assert torch.equal(mul.gmm(N), torch.ones(HEADS, N, N, dtype=torch.float64))
    assert torch.allclose(mul(x), ref(x), atol=1e-12, rtol=0)
    assert torch.allclose(mul(x, real)[1, :18], ref(x, real)[1, :18], atol=1e-12, rtol=0)
    ref, add = _pair("add", causal)
    with torch.no_grad():                     # alpha = 0: G = 0 exactly
        add.alpha.zero_()
    assert torch.equal(add.gmm(N), torch.zeros(HEADS, N, N, dtype=torch.float64))
    assert torch.allclose(add(x), ref(x), atol=1e-12, rtol=0)
    assert torch.allclose(add(x, real)[1, :18], ref(x, real)[1, :18], atol=1e-12, rtol=0)
    # and a random mask does change the output
    _, rnd = _pair("multiply", causal)
    assert not torch.allclose(rnd(x), ref(x), atol=1e-3)


def _set(att, alpha, sigma):
    with torch.no_grad():
        att.alpha.copy_(torch.tensor(alpha, dtype=torch.float64).view(-1, 1, 1, 1).expand_as(att.alpha))
        att.sigma.copy_(torch.tensor(sigma, dtype=torch.float64).view(-1, 1, 1, 1).expand_as(att.sigma))


def test_mask_values_by_hand_1d():
    _, att = _pair("multiply", num_kernels=2)
    _set(att, [1.5, -0.5], [2.0, 5.0])
    g = att.gmm(10)[0]

    def hand(d):
        return 1.5 * math.exp(-d * d / (2 * (4 + 1e-5))) - 0.5 * math.exp(-d * d / (2 * (25 + 1e-5)))

    for i, j in [(0, 0), (0, 1), (3, 7), (9, 0), (5, 2)]:
        assert g[i, j].item() == pytest.approx(hand(abs(i - j)), abs=1e-12)
    assert torch.equal(g, g.T)


def test_mask_values_by_hand_2d_grid_with_cls():
    _, att = _pair("multiply", num_kernels=1, grid=(3, 4), prefix_tokens=1)
    _set(att, [2.0], [1.5])
    g = att.gmm(13)[0]
    # token 1 + 4r + c sits at (r, c); (0,0) -> (2,3): d^2 = 4 + 9; (1,1) -> (0,2): d^2 = 1 + 1
    assert g[1, 1 + 4 * 2 + 3].item() == pytest.approx(2 * math.exp(-13 / (2 * (2.25 + 1e-5))), abs=1e-12)
    assert g[1 + 4 + 1, 1 + 2].item() == pytest.approx(2 * math.exp(-2 / (2 * (2.25 + 1e-5))), abs=1e-12)
    assert (g[0] == 1).all() and (g[:, 0] == 1).all()              # the CLS row/column is left unmasked
    _, add = _pair("add", num_kernels=1, grid=(3, 4), prefix_tokens=1)
    assert (add.gmm(13)[:, 0] == 0).all()
    with pytest.raises(ValueError, match="gmm_mask.*grid"):
        att(torch.randn(1, 12, DIM, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["multiply", "add"])
def test_explicit_formula(mode):
    _, att = _pair(mode)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    q, k, v = att.qkv(x).view(2, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)
    i = torch.arange(N, dtype=torch.float64)
    d2 = (i[:, None] - i[None, :]) ** 2
    g = (att.alpha * torch.exp(-d2 / (2 * (att.sigma ** 2 + 1e-5)))).sum(0)
    ref = torch.softmax(s * g if mode == "multiply" else s + g, -1) @ v
    assert torch.allclose(att.mix(q, k, v, None), ref, atol=1e-12)


@pytest.mark.parametrize("mode", ["multiply", "add"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_and_causality(mode, causal):
    _, att = _pair(mode, causal)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    real = torch.ones(2, N, dtype=torch.bool)
    real[:, 17:] = False
    y = att(x, real)
    assert torch.isfinite(y).all() and torch.allclose(y[:, :17], att(x[:, :17]), atol=1e-12)
    if causal:
        x2 = x.clone()
        x2[:, 9:] -= 2.0
        assert torch.allclose(att(x2)[:, :9], att(x)[:, :9], atol=1e-12)


def test_parameters_and_bad_mode():
    att = build_attention("gmm_mask", dim=DIM, num_heads=HEADS, max_len=64)
    extra = sum(p.numel() for n, p in att.named_parameters() if n in ("alpha", "sigma"))
    assert extra == 2 * 5 * HEADS                                  # two numbers per kernel per head
    with pytest.raises(ValueError, match="gmm_mask.*mode"):
        build_attention("gmm_mask", dim=DIM, num_heads=HEADS, max_len=64, mode="both")
