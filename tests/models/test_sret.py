"""SReT specifics: official key mapping (its shared blocks appear twice in the official state dict),
recursion, sliced group attention and its deterministic slice orders, other input sizes.

timm has no SReT. Equivalence with the official SReT.py (same weights -> same logits, atol ~1e-6 for
SReT_T/LT/S at 224) was checked outside the repository with its `torch.randperm` replaced by the
identity (matches eval_order='contiguous') and by the strided permutation (matches 'strided').
Here the same relation is shown on our own 'random' path, which follows the official code.
"""
import pytest
import torch

import formers
from formers.models.sret import SlicedGroupAttention, checkpoint_filter_fn

TINY = dict(base_dims=(32, 32, 32), heads=(2, 4, 8), depth=(4, 10, 6), recursive_num=(2, 5, 3), mlp_ratio=3.6,
            np_mlp_ratio=1)


def official_keys(base_dims, heads, depth, recursive_num, mlp_ratio, np_mlp_ratio, img=224, in_chans=3,
                  num_classes=1000):
    """Key -> shape of the official SReT state dict, written from its definition: pos_embed (1, C0, img/8, img/8);
    conv_embedding conv1..3 (3x3, bias) + bn1..3 (with running stats); per stage a Transformer whose
    `blocks` list is [B0, NP0, B0, NP1, B1, NP2, B1, NP3, ...] (each shared Transformer_Block at two
    indices: norm1, attn.qkv/proj, norm2, mlp.fc1/fc2, coefficient1..4.bias; each Non_proj: norm1,
    mlp.fc1/fc2 of ratio np_mlp_ratio, coefficient1..2.bias); pools.{s}.conv (depthwise, groups = C_in,
    3x3) between stages; norm; head."""
    dims = [b * h for b, h in zip(base_dims, heads)]
    c0 = dims[0]
    keys = {"pos_embed": (1, c0, img // 8, img // 8)}
    for i, (cin, cout) in enumerate([(in_chans, c0 // 2), (c0 // 2, c0), (c0, c0)], start=1):
        keys[f"patch_embed.conv{i}.weight"], keys[f"patch_embed.conv{i}.bias"] = (cout, cin, 3, 3), (cout,)
        for n in ("weight", "bias", "running_mean", "running_var"):
            keys[f"patch_embed.bn{i}.{n}"] = (cout,)
        keys[f"patch_embed.bn{i}.num_batches_tracked"] = ()
    for s, (d, dep, rn) in enumerate(zip(dims, depth, recursive_num)):
        hidden, np_hidden, loops = int(d * mlp_ratio), int(d * np_mlp_ratio), dep // rn
        block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                 "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                 "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden),
                 "mlp.fc2.bias": (d,), **{f"coefficient{n}.bias": (1,) for n in range(1, 5)}}
        non_proj = {"norm1.weight": (d,), "norm1.bias": (d,), "mlp.fc1.weight": (np_hidden, d),
                    "mlp.fc1.bias": (np_hidden,), "mlp.fc2.weight": (d, np_hidden), "mlp.fc2.bias": (d,),
                    "coefficient1.bias": (1,), "coefficient2.bias": (1,)}
        for i in range(2 * rn * loops):
            for k, v in (block if i % 2 == 0 else non_proj).items():
                keys[f"transformers.{s}.blocks.{i}.{k}"] = v
        if s + 1 < len(dims):
            keys[f"pools.{s}.conv.weight"], keys[f"pools.{s}.conv.bias"] = (dims[s + 1], 1, 3, 3), (dims[s + 1],)
    keys["norm.weight"], keys["norm.bias"] = (dims[-1],), (dims[-1],)
    keys["head.weight"], keys["head.bias"] = (num_classes, dims[-1]), (num_classes,)
    return keys


def _official_sd(seed=0):
    """A random official state dict where, as in the real one, a shared block's two copies are the same tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_keys(**TINY).items():
        parts = k.split(".")
        if k.startswith("transformers.") and int(parts[3]) % 4 == 2:  # the second pass of a shared block
            sd[k] = sd[".".join(parts[:3] + [str(int(parts[3]) - 2)] + parts[4:])]
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g) + (1.0 if "coefficient" in k or "running_var" in k else 0.0)
    return sd


def test_official_keys_fully_mapped():
    keys = official_keys(**TINY)
    with torch.device("meta"):
        model = formers.create_model("sret_tiny")
    own = model.state_dict()
    mapped = checkpoint_filter_fn({"model": {k: torch.empty(s, device="meta") for k, s in keys.items()}}, model)
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert tuple(v.shape) == tuple(own[k].shape), k
    # every official name lands somewhere; the shared blocks' second copies collapse onto the first
    assert len(keys) - len(own) == 16 * (2 + 5 + 3)  # 16 tensors in each of the 2 + 5 + 3 shared blocks


def test_official_weights_load_where_they_belong():
    sd = _official_sd()
    model = formers.create_model("sret_tiny")
    mapped = checkpoint_filter_fn(sd, model)
    model.load_state_dict(mapped, strict=True)
    st = model.stages
    # stage 2 (index 1): [B0, NP0, B0, NP1, B1, NP2, B1, NP3, ...]
    assert torch.equal(st[1].blocks[1].attn.qkv.weight, sd["transformers.1.blocks.4.attn.qkv.weight"])
    assert torch.equal(st[1].blocks[4].coefficient3.scale, sd["transformers.1.blocks.18.coefficient3.bias"])
    assert torch.equal(st[1].non_projs[0].mlp.fc1.weight, sd["transformers.1.blocks.1.mlp.fc1.weight"])
    assert torch.equal(st[1].non_projs[3].coefficient2.scale, sd["transformers.1.blocks.7.coefficient2.bias"])
    assert torch.equal(st[1].non_projs[9].norm1.bias, sd["transformers.1.blocks.19.norm1.bias"])
    assert torch.equal(st[2].downsample.weight, sd["pools.1.conv.weight"])
    assert torch.equal(model.patch_embed.bn2.running_var, sd["patch_embed.bn2.running_var"])
    again = checkpoint_filter_fn(model.state_dict(), model)
    assert set(again) == set(model.state_dict())
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_each_shared_block_runs_twice_second_pass_recursive():
    model = formers.create_model("sret_tiny").eval()
    calls = []
    for s, stage in enumerate(model.stages):
        for r, blk in enumerate(stage.blocks):
            blk.attn.register_forward_hook(lambda m, a, o, s=s, r=r: calls.append((s, r, a[1])))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    expect = [(s, r, rec) for s, n in enumerate((2, 5, 3)) for r in range(n) for rec in (False, True)]
    assert calls == expect
    assert [len(st.non_projs) for st in model.stages] == [4, 10, 6]


def _sliced_reference(attn, x, slices):
    """Attention run separately in each slice (a list of token-index tensors), then projected."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    out = torch.zeros_like(x)
    for idx in slices:
        q, k, v = attn.qkv(x[:, idx]).reshape(b, len(idx), 3, h, d).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * d ** -0.5).softmax(-1)
        out[:, idx] = (a @ v).transpose(1, 2).reshape(b, len(idx), c)
    return attn.proj(out)


@pytest.mark.parametrize("order", ["strided", "contiguous"])
def test_sliced_attention_slices(order):
    torch.manual_seed(0)
    attn = SlicedGroupAttention(32, 2, groups1=4, groups2=2, eval_order=order).eval()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        first = attn(x, recursive=False)
        second = attn(x, recursive=True)
        full = _sliced_reference(attn, x, [torch.arange(24)])
        torch.testing.assert_close(first, _sliced_reference(attn, x, list(torch.arange(24).chunk(4))))
        slices = [torch.arange(r, 24, 2) for r in range(2)] if order == "strided" else list(torch.arange(24).chunk(2))
        torch.testing.assert_close(second, _sliced_reference(attn, x, slices))
    assert (first - full).abs().max() > 1e-3  # slicing changes the result


@pytest.mark.parametrize("order", ["strided", "contiguous"])
def test_deterministic_orders_are_the_official_shuffle_with_a_fixed_permutation(order, monkeypatch):
    """Our 'random' path follows the official code (randperm, contiguous slices of the shuffled tokens,
    argsort back); with randperm returning the strided / identity permutation it gives exactly our
    deterministic 'strided' / 'contiguous' eval orders, on a whole model."""
    torch.manual_seed(0)
    det = formers.create_model("sret_tiny", eval_order=order).eval()
    rnd = formers.create_model("sret_tiny", eval_order="random").eval()
    rnd.load_state_dict(det.state_dict())
    x = torch.randn(2, 3, 64, 64)

    def fixed(n, device=None, **kwargs):
        return torch.arange(n).reshape(n // 2, 2).t().flatten() if order == "strided" else torch.arange(n)

    with torch.no_grad():
        a, b = det(x), det(x)
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # deterministic
        r1, r2 = rnd(x), rnd(x)
        assert (r1 - r2).abs().max() > 1e-6  # the official behaviour: a fresh shuffle per call
        monkeypatch.setattr(torch, "randperm", fixed)
        torch.testing.assert_close(rnd(x), a, atol=1e-5, rtol=1e-5)


def test_training_shuffles_unless_told_not_to():
    torch.manual_seed(0)
    model = formers.create_model("sret_demo").train()
    x = torch.randn(2, 3, 32, 32)
    model.patch_embed.eval()  # keep BatchNorm out of the comparison
    with torch.no_grad():
        assert (model(x) - model(x)).abs().max() > 1e-6
    for m in model.modules():
        if isinstance(m, SlicedGroupAttention):
            m.train_shuffle = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.eval()(x), atol=0, rtol=0)


def test_drop_path_rates_follow_the_official_rule():
    model = formers.create_model("sret_tiny", drop_path_rate=0.2)
    rates = [[getattr(blk.drop_path, "p", 0.0) for blk in st.blocks] for st in model.stages]  # rate 0: Identity
    # rate * i / total_depth, i counting the stage's depth from its first layer; the first
    # recursive_num of each stage go to its shared blocks
    expect = [[0.2 * i / 20 for i in range(start, start + n)] for start, n in ((0, 2), (4, 5), (14, 3))]
    assert [len(r) for r in rates] == [2, 5, 3]
    for got, want in zip(rates, expect):
        assert got == pytest.approx(want)
    assert rates[2][2] == pytest.approx(0.2 * 16 / 20)


def test_other_input_sizes_and_clear_errors():
    torch.manual_seed(0)
    m224 = formers.create_model("sret_tiny").eval()
    m256 = formers.create_model("sret_tiny", img_size=256).eval()
    m256.load_state_dict(checkpoint_filter_fn(m224.state_dict(), m256))
    assert m256.pos_embed.shape == (1, 64, 32, 32)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(m224(x), m256(x), atol=1e-5, rtol=1e-5)
        feats = m224.forward_intermediates(torch.randn(1, 3, 224, 160), intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 28, 20), (1, 128, 14, 10), (1, 256, 7, 5)]
    with pytest.raises(ValueError, match=r"sret_tiny.*200x200.*slices"):
        m224(torch.randn(1, 3, 200, 200))
    with pytest.raises(ValueError, match="slices"):
        formers.create_model("sret_tiny", img_size=200)


def test_intermediates_and_head():
    model = formers.create_model("sret_tiny").eval()
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(64, 8), (128, 16), (256, 32)]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [tuple(f.shape) for f in feats] == [(1, 64, 12, 12), (1, 128, 6, 6), (1, 256, 3, 3)]
        torch.testing.assert_close(final, model.forward_features(x))
        pooled = model.forward_head(final, pre_logits=True)
        torch.testing.assert_close(pooled, model.norm(final.mean((2, 3))))  # GAP, then LayerNorm
        torch.testing.assert_close(model(x), model.head(pooled))


def test_demo_learns_a_few_steps():
    """sret_demo fits a small two-class problem (which half of the image is brighter) in a few steps."""
    torch.manual_seed(0)
    model = formers.create_model("sret_demo", num_classes=2, in_chans=1)
    x = torch.randn(64, 1, 32, 32)
    y = torch.randint(0, 2, (64,))
    x[:, :, :, :16] += (2 * y - 1).float().view(-1, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
