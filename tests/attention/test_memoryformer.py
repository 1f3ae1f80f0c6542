"""MemoryFormer: sign-bit bucket ids, hand-built lookups, the closed-form bucket weight against the
brute-force softmax over all codes, parameter / MAC accounting, padding, causality, gradients."""
import itertools

import pytest
import torch

from formers.attention import build_attention
from formers.attention.memoryformer import (MemoryFFN, MemoryLayer, bucket_weight, hash_codes,
                                            memory_layer_cost)


def test_bucket_id_is_the_sign_bits_read_big_endian():
    z = torch.tensor([[0.3, -0.1, 0.0, -2.0], [-1.0, -1.0, -1.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    assert hash_codes(z).tolist() == [0b1010, 0b0001, 0b1111]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 8, generator=g)
    read = [int("".join("1" if v >= 0 else "0" for v in row), 2) for row in z.tolist()]
    assert hash_codes(z).tolist() == read


def test_hand_built_input_retrieves_the_expected_rows():
    layer = MemoryLayer(8, 3, code_length=4, score="paper").double()
    with torch.no_grad():
        layer.tables.copy_(torch.arange(2 * 16 * 3, dtype=torch.float64).view(32, 3))
        layer.bias.copy_(torch.tensor([0.5, -0.5, 1.0]))
    x = torch.tensor([[1.0, -1.0, 2.0, -0.5, -3.0, -1.0, 0.25, 4.0]], dtype=torch.float64)
    # chunk 0: + - + - -> 0b1010 = 10 in table 0; chunk 1: - - + + -> 0b0011 = 3 in table 1 (row 16 + 3)
    rows, w = layer.lookup(x)
    assert rows.tolist() == [[10, 19]]
    p = [torch.sigmoid(2 * x[0, s].abs()).prod() for s in (slice(0, 4), slice(4, 8))]
    expected = p[0] * layer.tables[10] + p[1] * layer.tables[19] + layer.bias
    assert torch.allclose(layer(x)[0], expected, atol=1e-12)
    # flipping the sign of one coordinate moves exactly one table's row, by its bit's place value
    x2 = x.clone()
    x2[0, 5] = 1.0                                   # chunk 1, bit 1 (place 4)
    assert layer.lookup(x2)[0].tolist() == [[10, 19 + 4]]


def test_paper_weight_is_the_softmax_over_all_codes_at_the_chosen_bucket():
    tau = 4
    codes = torch.tensor(list(itertools.product([1.0, -1.0], repeat=tau)), dtype=torch.float64)
    ids = hash_codes(codes)                                      # b_i in {-1,+1}^tau and its bucket id
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, tau, generator=g, dtype=torch.float64)
    probs = torch.softmax(z @ codes.T, -1)                       # (20, 16)
    best = probs.argmax(-1)
    assert torch.equal(ids[best], hash_codes(z))                 # the most likely code is the sign code
    assert torch.allclose(probs.max(-1).values, bucket_weight(z, "paper"), atol=1e-14)
    assert torch.allclose(bucket_weight(z, "official"), z.abs().sum(-1) * bucket_weight(z, "paper"))


def test_cost_against_formula_and_module_parameters():
    # the official tiny config: hidden 512, code_length 8 -> 64 tables of 256 rows
    c = memory_layer_cost(512, 512, 8)
    assert c == dict(params=64 * 256 * 512 + 512, macs=64 * (512 + 8),
                     linear_params=512 * 512 + 512, linear_macs=512 * 512)
    assert c["params"] == 8_389_120 and c["linear_macs"] / c["macs"] == pytest.approx(7.877, abs=1e-3)
    with torch.device("meta"):
        layer, ffn = MemoryLayer(512, 512, 8), MemoryFFN(512, code_length=8)
        att = build_attention("memoryformer", dim=512, num_heads=8, max_len=16, out_proj="memory")
    assert sum(p.numel() for p in layer.parameters()) == c["params"]
    # FFN: 512 -> 64 * 10 = 640 (tau 8), LayerNorm, 640 -> 512 (tau 10: 64 tables of 1024 rows)
    ffn_params = memory_layer_cost(512, 640, 8)["params"] + 2 * 640 + memory_layer_cost(640, 512, 10)["params"]
    assert sum(p.numel() for p in ffn.parameters()) == ffn_params == 64 * 256 * 640 + 640 + 1280 + 64 * 1024 * 512 + 512
    qkv_out = memory_layer_cost(512, 3 * 512, 8)["params"] + c["params"]
    assert sum(p.numel() for p in att.parameters()) == qkv_out


@pytest.mark.parametrize("causal", [False, True])
def test_padding_and_attention_is_softmax_over_hashed_qkv(causal):
    torch.manual_seed(0)
    att = build_attention("memoryformer", dim=32, num_heads=4, max_len=40, causal=causal, code_length=4).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    out = att(x)
    q, k, v = att.qkv(x).view(2, 13, 3, 4, 8).permute(2, 0, 3, 1, 4)
    a = q @ k.transpose(-2, -1) / 8 ** 0.5
    if causal:
        a = a.masked_fill(~torch.ones(13, 13, dtype=torch.bool).tril(), float("-inf"))
    ref = (torch.softmax(a, -1) @ v).transpose(1, 2).reshape(2, 13, 32)
    assert torch.allclose(out, ref, atol=1e-12)
    xp = torch.cat([x, torch.randn(2, 7, 32, dtype=torch.float64)], 1)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, 13:] = False
    assert torch.allclose(att(xp, mask)[:, :13], out, atol=1e-12)


def test_gradients_reach_tables_and_input():
    torch.manual_seed(0)
    att = build_attention("memoryformer", dim=32, num_heads=4, max_len=40, out_proj="memory")
    x = torch.randn(2, 9, 32, requires_grad=True)
    att(x).square().sum().backward()
    assert att.qkv.tables.grad.abs().sum() > 0 and att.proj.tables.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0                        # through the bucket weights p(z)
    # only the retrieved rows get gradient: at most B*N rows per table
    touched = (att.qkv.tables.grad.abs().sum(-1) > 0).sum().item()
    assert 0 < touched <= 2 * 9 * att.qkv.num_tables


def test_bad_options():
    with pytest.raises(ValueError, match="memoryformer"):
        build_attention("memoryformer", dim=30, num_heads=3, max_len=8)          # 30 % 8 != 0
    with pytest.raises(ValueError, match="memoryformer"):
        build_attention("memoryformer", dim=32, num_heads=4, max_len=8, score="cosine")
