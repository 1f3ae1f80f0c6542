"""URPE vs plain relative-PE attention: identical tokens give identical outputs under RPE (the softmax
rows sum to one) and position-dependent outputs under URPE; URPE with c = 1 is RPE; C and B are
Toeplitz; the bucketing; padding and causality; the paper's Position Identification task in miniature."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.attention import build_attention
from formers.lra.model import Block
from formers.attention.urpe import RelativeTable, relative_bucket

DIM, HEADS, N = 24, 3, 33


def _pair(causal=False, **kw):
    torch.manual_seed(0)
    rpe = build_attention("relpe", dim=DIM, num_heads=HEADS, max_len=64, causal=causal, **kw).double()
    urpe = build_attention("urpe", dim=DIM, num_heads=HEADS, max_len=64, causal=causal, **kw).double()
    urpe.load_state_dict(rpe.state_dict(), strict=False)     # same projections and bias b
    with torch.no_grad():
        urpe.ur_scale.weight.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(1))
    return rpe, urpe


def _rows_spread(y):
    return (y - y[:, :1]).abs().amax().item()


@pytest.mark.parametrize("causal", [False, True])
def test_identical_tokens_rpe_cannot_see_position_urpe_can(causal):
    rpe, urpe = _pair(causal)
    x = torch.randn(1, 1, DIM, dtype=torch.float64).expand(2, N, DIM)
    assert _rows_spread(rpe(x)) < 1e-12                        # every position outputs the same vector
    assert _rows_spread(urpe(x)) > 1e-2                        # a non-constant c breaks the symmetry
    # the bias b is not the reason: a large random b still leaves RPE position-blind
    with torch.no_grad():
        rpe.rel_bias.weight.normal_(0, 3.0)
    assert _rows_spread(rpe(x)) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_urpe_with_unit_c_equals_relpe(causal):
    rpe, urpe = _pair(causal)
    with torch.no_grad():
        urpe.ur_scale.weight.fill_(1.0)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    real = torch.ones(2, N, dtype=torch.bool)
    real[1, 25:] = False
    assert torch.allclose(urpe(x), rpe(x), atol=1e-12, rtol=0)
    assert torch.allclose(urpe(x, real)[:, :25], rpe(x, real)[:, :25], atol=1e-12, rtol=0)
    # and a fresh URPE starts as RPE (c initialised to ones, as --constant-init-ur-attn)
    fresh = build_attention("urpe", dim=DIM, num_heads=HEADS, max_len=64)
    assert torch.equal(fresh.ur_scale.weight, torch.ones_like(fresh.ur_scale.weight))


def test_urpe_equals_explicit_formula():
    _, urpe = _pair()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    q, k, v = urpe.qkv(x).view(2, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    i = torch.arange(N)
    b = urpe.rel_bias.weight[(i[None, :] - i[:, None]) + 63].permute(2, 0, 1)
    c = urpe.ur_scale.weight[(i[None, :] - i[:, None]) + 63].permute(2, 0, 1)
    ref = (torch.softmax(q @ k.transpose(-2, -1) / (DIM // HEADS) ** 0.5 + b, -1) * c) @ v
    assert torch.allclose(urpe.mix(q, k, v, None), ref, atol=1e-12)


@pytest.mark.parametrize("buckets", [None, 16])
def test_tables_are_toeplitz(buckets):
    t = RelativeTable(HEADS, 40, buckets, max_distance=20)(40)
    for d in range(-39, 40):
        diag = t.diagonal(d, dim1=-2, dim2=-1)
        assert torch.equal(diag, diag[:, :1].expand_as(diag))
    assert t.shape == (HEADS, 40, 40)
    assert RelativeTable(HEADS, 40).weight.shape == (79, HEADS)


def test_official_bucketing():
    # 16 buckets: 8 per sign, offsets 0..3 exact, then log bins up to max_distance 20, clipped at 7
    off = torch.tensor([0, 1, 3, 4, 6, 10, 19, 20, 100, -1, -4, -100])
    assert relative_bucket(off, 16, 20).tolist() == [0, 1, 3, 4, 5, 6, 7, 7, 7, -1, -4, -7]


@pytest.mark.parametrize("name", ["relpe", "urpe"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_never_changes_real_tokens(name, causal):
    rpe, urpe = _pair(causal)
    att = rpe if name == "relpe" else urpe
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    real = torch.ones(2, N, dtype=torch.bool)
    real[:, 20:] = False
    y = att(x, real)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[:, :20], att(x[:, :20]), atol=1e-12)
    if causal:
        x2 = x.clone()
        x2[:, 10:] += 1.0
        assert torch.allclose(att(x2)[:, :10], att(x)[:, :10], atol=1e-12)


def test_bad_options():
    with pytest.raises(ValueError, match="urpe.*c_init"):
        build_attention("urpe", dim=DIM, num_heads=HEADS, max_len=8, c_init="zeros")
    with pytest.raises(ValueError, match="buckets"):
        build_attention("relpe", dim=DIM, num_heads=HEADS, max_len=8, buckets=7)


def _position_identification(name, steps=200, n=8, dim=32):
    """URPE's synthetic task: random tokens, no absolute positions, predict each token's index."""
    torch.manual_seed(0)
    emb, block = nn.Embedding(20, dim), Block(name, dim, 4, 4 * dim, n, 0.0, 0.0, {})
    norm, head = nn.LayerNorm(dim), nn.Linear(dim, n)
    params = [p for m in (emb, block, norm, head) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)

    def run(x):
        return head(norm(block(emb(x), None)))

    for _ in range(steps):
        x = torch.randint(0, 20, (32, n))
        loss = F.cross_entropy(run(x).flatten(0, 1), torch.arange(n).repeat(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (run(torch.randint(0, 20, (256, n))).argmax(-1) == torch.arange(n)).float().mean().item()


def test_position_identification_urpe_learns_relpe_cannot():
    assert _position_identification("relpe") < 0.25          # chance is 1/8
    assert _position_identification("urpe") > 0.9
