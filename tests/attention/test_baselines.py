"""The LRA baselines: each linear-form mechanism equals its explicit quadratic form, local
attention equals masked full attention, and padding never changes the real tokens."""
import pytest
import torch
import torch.nn.functional as F

from formers.attention import build_attention
from formers.attention.linear import feature_map, linear_attention

torch.manual_seed(0)
B, H, N, D = 2, 3, 37, 8


def _qkv():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))


def _explicit(phi_q, phi_k, v, causal):
    a = phi_q @ phi_k.transpose(-2, -1)
    if causal:
        a = a.tril()
    return (a / a.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_linear_form_equals_quadratic_form(causal):
    q, k, v = _qkv()
    out = linear_attention(feature_map(q), feature_map(k), v, causal, eps=0.0)
    assert torch.allclose(out, _explicit(feature_map(q), feature_map(k), v, causal), atol=1e-12)


def test_performer_relu_kernel_is_exact_in_its_features():
    att = build_attention("performer", dim=H * D, num_heads=H, max_len=64, num_features=32).double()
    q, k, v = _qkv()
    fq, fk = att.features(q, True), att.features(k, False)
    assert torch.allclose(att.mix(q, k, v, None), _explicit(fq, fk, v, False), atol=1e-6)


def test_performer_softmax_kernel_estimates_softmax_attention():
    q, k, v = (t * 0.5 for t in _qkv())
    exact = F.scaled_dot_product_attention(q, k, v)
    errs = {}
    for m in (8, 2048):
        att = build_attention("performer", dim=H * D, num_heads=H, max_len=64, num_features=m,
                              kernel="softmax").double()
        errs[m] = (att.mix(q, k, v, None) - exact).abs().mean().item()
    assert errs[2048] < 0.05 and errs[2048] < errs[8] / 3, errs


def test_orthogonal_feature_blocks():
    from formers.attention.performer import orthogonal_features
    w = orthogonal_features(2 * D, D, torch.Generator().manual_seed(0))
    block = w[:D] / w[:D].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(D), atol=1e-5)


def test_local_equals_block_diagonal_full_attention():
    att = build_attention("local", dim=H * D, num_heads=H, max_len=64, block=10).double()
    q, k, v = _qkv()
    blk = torch.arange(N) // 10
    same = blk[:, None] == blk[None, :]
    assert torch.allclose(att.mix(q, k, v, None), F.scaled_dot_product_attention(q, k, v, attn_mask=same),
                          atol=1e-12)
    causal = build_attention("local", dim=H * D, num_heads=H, max_len=64, block=10, causal=True).double()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=same & torch.ones(N, N, dtype=torch.bool).tril())
    assert torch.allclose(causal.mix(q, k, v, None), ref, atol=1e-12)


def test_linformer_equals_attention_over_projected_keys():
    att = build_attention("linformer", dim=H * D, num_heads=H, max_len=64, k=5).double()
    q, k, v = _qkv()
    kp = torch.einsum("kn,bhnd->bhkd", att.proj_k[:, :N], k)
    vp = torch.einsum("kn,bhnd->bhkd", att.proj_v[:, :N], v)
    ref = torch.softmax(q @ kp.transpose(-2, -1) / D ** 0.5, -1) @ vp
    assert torch.allclose(att.mix(q, k, v, None), ref, atol=1e-12)
    with pytest.raises(ValueError, match="linformer.*causal"):
        build_attention("linformer", dim=16, num_heads=2, max_len=8, causal=True)


@pytest.mark.parametrize("name", ["linear", "performer", "linformer", "local"])
def test_padding_does_not_change_real_tokens(name):
    att = build_attention(name, dim=H * D, num_heads=H, max_len=64).eval()
    x = torch.randn(2, N, H * D)
    padded = torch.cat([x, torch.randn(2, 9, H * D) * 5], 1)
    mask = torch.ones(2, N + 9, dtype=torch.bool)
    mask[:, N:] = False
    with torch.no_grad():
        ref, out = att(x), att(padded, mask)[:, :N]
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_local_block_of_padding_only_gives_finite_gradients():
    att = build_attention("local", dim=16, num_heads=2, max_len=64, block=4)
    x = torch.randn(1, 12, 16, requires_grad=True)
    mask = torch.tensor([[True] * 4 + [False] * 8])
    att(x, mask).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(att.qkv.weight.grad).all()


def test_bad_inputs_name_the_mechanism():
    att = build_attention("local", dim=16, num_heads=2, max_len=8)
    with pytest.raises(ValueError, match="'local'.*max_len=8"):
        att(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="'local'.*mask must be bool"):
        att(torch.randn(1, 4, 16), torch.ones(1, 4))
    with pytest.raises(ValueError, match="unknown attention 'nope'"):
        build_attention("nope", 16, 2, 8)
    with pytest.raises(ValueError, match="divisible"):
        build_attention("linear", 15, 2, 8)
