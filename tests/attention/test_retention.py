"""Retention: the parallel, recurrent and chunkwise forms agree (raw and through the whole layer),
the explicit per-pair sum, the decay rates, the symmetric bidirectional adaptation, padding, causality."""
import pytest
import torch

from formers.attention import build_attention
from formers.attention.retention import retention_chunkwise, retention_parallel, retention_recurrent
from formers.layers.retention import apply_rotary, retention_log_decay, rotary_angles, rotary_sin_cos

B, H, N, D = 2, 3, 23, 4


def _qkv(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))


def test_raw_forms_agree_with_the_explicit_sum():
    q, k, v = _qkv()
    ld = retention_log_decay(H).double()
    gamma = ld.exp()
    ref = torch.zeros(B, H, N, D, dtype=torch.float64)
    for n in range(N):
        for m in range(n + 1):
            ref[:, :, n] += (gamma ** (n - m))[None, :, None] * (q[:, :, n] * k[:, :, m]).sum(-1, keepdim=True) * v[:, :, m]
    assert torch.allclose(retention_parallel(q, k, v, ld), ref, atol=1e-10)
    assert torch.allclose(retention_recurrent(q, k, v, ld), ref, atol=1e-10)
    for chunk in (1, 4, 5, 23, 64):                   # dividing N or not, one chunk or many
        assert torch.allclose(retention_chunkwise(q, k, v, ld, chunk), ref, atol=1e-10), chunk
    sym = retention_parallel(q, k, v, ld, causal=False)
    dist = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs()
    d = gamma[:, None, None] ** dist
    assert torch.allclose(sym, ((q @ k.transpose(-2, -1)) * d) @ v, atol=1e-10)


def test_decay_rates_and_relative_rotation():
    assert retention_log_decay(4).exp().tolist() == pytest.approx([0.96875, 0.984375, 0.9921875, 0.99609375])
    g = torch.Generator().manual_seed(0)
    qv, kv = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    ang = rotary_angles(8).double()

    def score(n, m):
        sn, cn = rotary_sin_cos(torch.tensor(float(n), dtype=torch.float64), ang)
        sm, cm = rotary_sin_cos(torch.tensor(float(m), dtype=torch.float64), ang)
        return (apply_rotary(qv, sn, cn) * apply_rotary(kv, sm, cm)).sum()

    assert score(7, 3) == pytest.approx(score(12, 8).item(), abs=1e-12)       # depends on n - m only
    assert score(7, 3) != pytest.approx(score(7, 4).item(), abs=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_layer_three_forms_agree(dtype, tol):
    torch.manual_seed(0)
    att = build_attention("retention", dim=32, num_heads=4, max_len=64, causal=True, chunk_size=8).to(dtype)
    x = torch.randn(2, 30, 32, dtype=dtype)
    par = att(x)
    assert torch.allclose(att(x, mode="recurrent"), par, atol=tol, rtol=0)
    assert torch.allclose(att(x, mode="chunkwise"), par, atol=tol, rtol=0)
    for mode in ("recurrent", "chunkwise"):                       # built in that mode, same weights
        other = build_attention("retention", dim=32, num_heads=4, max_len=64, causal=True, mode=mode,
                                chunk_size=8).to(dtype)
        other.load_state_dict(att.state_dict())
        assert torch.allclose(other(x), par, atol=tol, rtol=0)


@pytest.mark.parametrize("causal,mode", [(True, "parallel"), (True, "chunkwise"), (True, "recurrent"),
                                         (False, "parallel")])
def test_padding_and_causality(causal, mode):
    torch.manual_seed(0)
    att = build_attention("retention", dim=32, num_heads=4, max_len=64, causal=causal, mode=mode,
                          chunk_size=8).double()
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    xp = torch.cat([x, torch.randn(2, 6, 32, dtype=torch.float64)], 1)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[:, 17:] = False
    out = att(x)
    assert torch.allclose(att(xp, mask)[:, :17], out, atol=1e-12)
    future_matters = not torch.allclose(att(xp)[:, :17], out, atol=1e-6)
    assert future_matters == (not causal)


def test_bidirectional_only_in_parallel_form():
    for mode in ("recurrent", "chunkwise"):
        with pytest.raises(ValueError, match="retention.*causal"):
            build_attention("retention", dim=32, num_heads=4, max_len=64, causal=False, mode=mode)
    with pytest.raises(ValueError, match="retention"):
        build_attention("retention", dim=32, num_heads=4, max_len=64, mode="fft")
    att = build_attention("retention", dim=32, num_heads=4, max_len=64, value_factor=2)
    assert att.v_proj.out_features == att.g_proj.out_features == att.out_proj.in_features == 64
    assert att(torch.randn(1, 5, 32)).shape == (1, 5, 32)


def test_decay_norm_is_torchscale_row_sum_of_d():
    from formers.layers.retention import decay_mask_1d
    for causal in (True, False):
        att = build_attention("retention", dim=32, num_heads=4, max_len=64, causal=causal).double()
        d = decay_mask_1d(11, att.log_decay.double(), causal).exp()
        assert torch.allclose(att.decay_norm(11, None, torch.float64), d.sum(-1).rsqrt(), atol=1e-12)
    mask = torch.tensor([[True] * 8 + [False] * 3])
    assert torch.allclose(att.decay_norm(11, mask, torch.float64)[0, :, :8],
                          att.decay_norm(8, None, torch.float64), atol=1e-12)
