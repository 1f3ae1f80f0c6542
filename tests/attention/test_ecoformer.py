"""EcoFormer: the +-1 code identity H_i.H_j = b - 2 Ham, the linear form against the explicit N x N
Hamming-affinity attention, the sparse + low-rank KSH loss against the dense one, the
straight-through sign, padding and causality."""
import pytest
import torch

from formers.attention import build_attention
from formers.attention.ecoformer import hamming, hamming_linear_attention, ksh_loss, ksh_targets, ste_sign

B, H, N, D, NB = 2, 3, 29, 8, 12


def _codes(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (B, H, n, NB), generator=g).double() * 2 - 1


def _explicit(hq, hk, v, shift, causal=False, real=None):
    s = hq @ hk.transpose(-2, -1) + shift                         # (B, H, N, N), all > 0 for shift > b
    if real is not None:
        s = s * real[:, None, None, :]
    if causal:
        s = s.tril()
    return (s / s.sum(-1, keepdim=True)) @ v


def test_inner_product_is_b_minus_twice_hamming():
    a, b = _codes(seed=1), _codes(seed=2)
    ham = hamming(a, b)
    assert torch.equal(a @ b.transpose(-2, -1), (NB - 2 * ham).double())
    assert ham.min() >= 0 and ham.max() <= NB and (hamming(a, a).diagonal(dim1=-2, dim2=-1) == 0).all()
    # the Hamming affinity b - Ham is the shifted inner product / 2
    assert torch.equal((NB - ham).double(), (a @ b.transpose(-2, -1) + NB) / 2)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_form_equals_explicit_affinity_attention(causal):
    hq, hk = _codes(seed=3), _codes(seed=4)
    v = torch.randn(B, H, N, D, dtype=torch.float64)
    shift = NB + 1.0
    out = hamming_linear_attention(hq, hk, v, shift, None, causal)
    assert torch.allclose(out, _explicit(hq, hk, v, shift, causal), atol=1e-12)
    # with padded keys
    real = torch.ones(B, N, dtype=torch.bool)
    real[0, 20:] = False
    out = hamming_linear_attention(hq, hk, v, shift, real, causal)
    ref = _explicit(hq, hk, v, shift, causal, real.double())
    assert torch.allclose(out[0, :, :20], ref[0, :, :20], atol=1e-12) and torch.allclose(out[1], ref[1], atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_official_own_value_form(causal):
    """value_bias='own': (H_i sum_j H_j v_j + c v_i) / (H_i.sum_j H_j + c N), N counting the (prefix) keys."""
    hq, hk = _codes(seed=5), _codes(seed=6)
    v = torch.randn(B, H, N, D, dtype=torch.float64)
    c = NB + 1.0
    s = hq @ hk.transpose(-2, -1)
    if causal:
        s = s.tril()
    count = torch.arange(1, N + 1, dtype=torch.float64)[:, None] if causal else N
    ref = (s @ v + c * v) / (s.sum(-1, keepdim=True) + c * count)
    assert torch.allclose(hamming_linear_attention(hq, hk, v, c, None, causal, "own"), ref, atol=1e-12)


def test_ksh_loss_equals_dense_formula():
    g = torch.Generator().manual_seed(7)
    n, k = 15, 3
    y = torch.randn(B, H, n, generator=g, dtype=torch.float64).tanh()
    prev = torch.randint(0, 2, (B, H, n, 4), generator=g).double() * 2 - 1
    sim = torch.randn(B, H, n, n, generator=g, dtype=torch.float64)
    il, is_ = sim.topk(k, -1).indices, sim.topk(k, -1, largest=False).indices
    dense = torch.zeros_like(sim).scatter_(-1, il, 1.0).scatter_(-1, is_, -1.0)   # the official S0
    S = NB * dense - torch.einsum("bhnr,bhmr->bhnm", prev, prev)
    ref = (-torch.einsum("bhn,bhnm,bhm->bh", y, S, y) / (n * NB)).mean()
    idx = torch.cat([il, is_], -1)
    val = torch.cat([torch.ones_like(il), -torch.ones_like(is_)], -1).double()
    got = ksh_loss(y, idx, val, prev, NB, torch.full((B, 1), float(n), dtype=torch.float64))
    assert torch.allclose(got, ref, atol=1e-12)


def test_straight_through_sign():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    y = ste_sign(x)
    assert torch.equal(y, torch.tensor([-1.0, -1, 1, 1, 1, 1]))
    y.backward(torch.arange(1.0, 7.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 2, 3, 4, 0, 0]))


def _attn(causal=False, **kw):
    torch.manual_seed(0)
    kw = dict(dict(nbits=8, num_anchors=6, topk=3, hash_iters=5), **kw)
    return build_attention("ecoformer", dim=24, num_heads=3, max_len=64, causal=causal, **kw).double()


def test_hash_fit_ignores_padding_and_padding_never_changes_real_tokens():
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    real = torch.ones(2, 40, dtype=torch.bool)
    real[:, 30:] = False
    fits = []
    for fill in (0.0, 100.0):
        att = _attn()
        xp = x.clone()
        xp[:, 30:] = fill
        torch.manual_seed(1)
        out = att(xp, real)
        fits.append((att.hash.A.clone(), att.hash.mu.clone(), out))
    assert torch.equal(fits[0][0], fits[1][0]) and torch.equal(fits[0][1], fits[1][1])
    assert torch.allclose(fits[0][2][:, :30], fits[1][2][:, :30], atol=1e-12)
    assert att.hash.trained
    # a fitted layer: the unpadded sequence gives the real tokens the same output
    assert torch.allclose(att(x[:, :30]), att(x, real)[:, :30], atol=1e-12)


def test_causal_prefix_does_not_see_the_future():
    att = _attn(causal=True)
    x = torch.randn(2, 40, 24, dtype=torch.float64)
    att(x)                                                   # fits the hash
    y = x.clone()
    y[:, 25:] = torch.randn(2, 15, 24, dtype=torch.float64)
    assert torch.allclose(att(x)[:, :25], att(y)[:, :25], atol=1e-12)
    assert not torch.allclose(att(x)[:, 25:], att(y)[:, 25:])


def test_gradients_reach_projection_and_state_dict_keeps_the_fit():
    att = _attn()
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    out = att(x)
    out.square().sum().backward()
    assert att.qk.weight.grad.abs().sum() > 0 and att.v.weight.grad.abs().sum() > 0
    fresh = _attn()
    fresh.load_state_dict(att.state_dict())
    assert fresh.hash.trained and torch.allclose(fresh(x), att(x), atol=1e-12)
    with pytest.raises(ValueError, match="ecoformer.*value_bias"):
        _attn(value_bias="bad")


def test_fit_lowers_the_ksh_objective():
    """The greedy bit fit targets min |Y Y^T - b S0|_F^2 (KSH); with a usable step it moves A and the
    fitted codes beat the initial random projection (same anchors, mu, sigma) on that objective."""
    att = _attn(hash_lr=0.5, hash_iters=30)
    x = torch.randn(2, 40, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        qk = att.qk(x).view(2, 40, 3, 8).transpose(1, 2)
        qk = qk / qk.norm(dim=-1, keepdim=True)
        sim = qk @ qk.transpose(-2, -1)
        s0 = torch.zeros_like(sim).scatter_(-1, sim.topk(3, -1).indices, 1.0)
        s0.scatter_(-1, sim.topk(3, -1, largest=False).indices, -1.0)
        torch.manual_seed(3)
        att.hash.fit(qk, None)

        def objective():
            h = att.hash(qk, torch.ones_like(qk[..., :1]))
            return ((h @ h.transpose(-2, -1) - 8 * s0) ** 2).sum().item()

        fitted, a_fit = objective(), att.hash.A.clone()
        att.hash.A.copy_(_attn().hash.A)
        initial = objective()
    assert not torch.equal(a_fit, att.hash.A)
    assert fitted < 0.99 * initial, (fitted, initial)


def test_ksh_targets_match_the_dense_scatter_in_row_chunks():
    x = torch.nn.functional.normalize(torch.randn(B, H, 23, D, dtype=torch.float64), dim=-1)
    real = torch.ones(B, 23, dtype=torch.bool)
    real[1, 17:] = False
    dense = torch.zeros(B, H, 23, 23, dtype=torch.float64)
    for i, n in enumerate((23, 17)):                 # the official S0 on each sample's real tokens
        sim = x[i, :, :n] @ x[i, :, :n].transpose(-2, -1)
        dense[i, :, :n, :n].scatter_(-1, sim.topk(4, -1).indices, 1.0)
        dense[i, :, :n, :n].scatter_(-1, sim.topk(4, -1, largest=False).indices, -1.0)
    for rows in (23, 5):
        idx, val = ksh_targets(x, real, 4, rows=rows)
        got = torch.zeros_like(dense).scatter_add_(-1, idx, val)
        assert torch.equal(got, dense)
    # fewer real keys than 2 topk: the overlap is -1, as the official scatter order gives
    idx, val = ksh_targets(x[:, :, :5], real[:, :5], 4)
    sim = x[:, :, :5] @ x[:, :, :5].transpose(-2, -1)
    ref = torch.zeros_like(sim).scatter_(-1, sim.topk(4, -1).indices, 1.0)
    ref.scatter_(-1, sim.topk(4, -1, largest=False).indices, -1.0)
    assert torch.equal(torch.zeros_like(sim).scatter_add_(-1, idx, val), ref)


def test_kernel_features_by_hand():
    """kappa(x)_j = exp(-|x - a_j|^2 / (2 sigma)) - mu_j, sigma = the mean squared token-anchor distance of
    the input (per sample and head), mu = the fitted mean kernel vector over batch and tokens."""
    from formers.attention.ecoformer import KernelHash
    x = torch.nn.functional.normalize(torch.randn(B, H, 20, D, dtype=torch.float64), dim=-1)
    kh = KernelHash(H, D, NB, num_anchors=5, topk=3, iters=1).double()
    kh.fit(x, None, anchors=x[:1, :, :5])
    d = ((x.unsqueeze(-2) - x[:1, :, :5].unsqueeze(-3)) ** 2).sum(-1)          # (B, H, 20, 5)
    sigma = d.mean((-2, -1), keepdim=True)
    kern = torch.exp(-d / (2 * sigma))
    assert torch.allclose(kh.mu, kern.mean((0, 2), keepdim=True), atol=1e-12)
    assert torch.allclose(kh.sigma, sigma.mean(0, keepdim=True), atol=1e-12)
    w = torch.ones_like(x[..., :1])
    assert torch.allclose(kh.kernel(x, w, stored_sigma=False), kern - kh.mu, atol=1e-12)
    # padded tokens take no part in sigma
    real = torch.ones(B, 24, dtype=torch.bool)
    real[:, 20:] = False
    xp = torch.cat([x, torch.ones(B, H, 4, D, dtype=torch.float64)], 2)
    assert torch.allclose(kh.kernel(xp, real[:, None, :, None].double(), False)[:, :, :20], kern - kh.mu, atol=1e-12)
