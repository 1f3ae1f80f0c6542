"""FuseGPT: zero coefficients == plain removal, Macro Influence by hand, merged == unmerged,
exact parameter drop, reload and CLI round trip, the byte-level GPT learns, clear errors."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import formers
from formers.cli import main
from formers.layers import TransformerBlock
from formers.sequence import GPT, random_windows, stdlib_corpus
from formers.transforms import TransformError, applied_transforms, load
from formers.transforms.base import save
from formers.transforms.fusegpt import (FuseLinear, _delete_block, _group, block_importance, fuse_group, fusegpt,
                                        merge_fused, removable_blocks)

torch.set_num_threads(1)

PVT_SMALL = dict(img_size=32, patch_size=2, embed_dims=(16, 24, 32, 48), num_heads=(1, 2, 2, 4),
                 mlp_ratios=(4, 4, 4, 2))
MODELS = {"swin_demo": dict(img_size=32), "t2t_vit_demo": dict(img_size=32), "tnt_demo": {}, "pvt_tiny": PVT_SMALL}


def build(name, seed=0):
    torch.manual_seed(seed)
    m = formers.create_model(name, num_classes=10, **MODELS[name]).eval()
    with torch.no_grad():   # break the symmetries of a fresh init (zero biases, unit norms)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def images(m, n=2, bs=4, seed=0):
    s = m.img_size if isinstance(m.img_size, int) else m.img_size[0]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, s, s, generator=g) for _ in range(n)]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


class Toy(nn.Module):
    def __init__(self, depth=4, dim=8):
        super().__init__()
        self.num_features = dim
        self.blocks = nn.ModuleList([TransformerBlock(dim, 2) for _ in range(depth)])

    def forward_features(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_coefficients_equal_plain_removal(name):
    m = build(name)
    xs = images(m)
    fused = fusegpt(copy.deepcopy(m), xs, remove=1, epochs=0)
    (path, index), = applied_transforms(fused)[0]["spec"]["removed"]
    assert path in removable_blocks(m)
    plain = copy.deepcopy(m)
    _delete_block(plain, path, index)
    with torch.no_grad():
        assert torch.equal(fused(xs[0]), plain(xs[0]))
        assert not torch.equal(plain(xs[0]), m(xs[0]))


def test_fuse_linear_starts_as_the_target_and_merges_exactly():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 5), nn.Linear(6, 5)
    f = FuseLinear(a, b, rank=3, lora_rank=2)
    x = torch.randn(7, 6)
    assert torch.equal(f(x), a(x))                       # C1 = 0, LoRA B = 0, bias coefficient = 0
    with torch.no_grad():
        for p in (f.coef_A, f.lora_B, f.coef_bias):
            p.normal_()
    w = a.weight + f.lora_B @ f.lora_A + (f.coef_A @ f.coef_B) * b.weight
    torch.testing.assert_close(f(x), x @ w.T + a.bias + f.coef_bias * b.bias)
    torch.testing.assert_close(f.merge()(x), f(x), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in f.merge().parameters()) == 5 * 6 + 5


def test_merged_blocks_equal_unmerged():
    torch.manual_seed(0)
    toy = Toy().eval()
    x = torch.randn(3, 5, 8)
    kept, victim = [toy.blocks[0], toy.blocks[2]], toy.blocks[1]
    layers = fuse_group(kept, victim, rank=2, lora_rank=2)
    assert len(layers) == 2 * 4                          # qkv, proj, fc1, fc2 of each kept block
    with torch.no_grad():
        for f in layers:
            for p in (f.coef_A, f.lora_B, f.coef_bias):
                p.normal_(std=0.3)
        before = toy.forward_features(x)
        merge_fused(toy)
        assert not any(isinstance(mod, FuseLinear) for mod in toy.modules())
        torch.testing.assert_close(toy.forward_features(x), before, rtol=0, atol=1e-5)


def test_macro_influence_by_hand():
    torch.manual_seed(0)
    toy = Toy().eval()
    with torch.no_grad():
        for p in toy.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for lin in (toy.blocks[2].attn.proj, toy.blocks[2].mlp.fc2):   # block 2 becomes the identity
            lin.weight.zero_()
            lin.bias.zero_()
    xs = [torch.randn(2, 6, 8), torch.randn(2, 6, 8)]
    scores = block_importance(toy, xs)
    torch.set_grad_enabled(False)
    for i in range(4):
        sims = []
        for x in xs:
            full, part = x, x
            for j, blk in enumerate(toy.blocks):
                full = blk(full)
                part = part if j == i else blk(part)
            sims.append(F.cosine_similarity(full, part, dim=-1).mean())
        assert scores[("blocks", i)] == pytest.approx(1 - float(torch.stack(sims).mean()), abs=1e-6)
    assert scores[("blocks", 2)] == pytest.approx(0.0, abs=1e-6)
    torch.set_grad_enabled(True)
    assert min(scores, key=scores.get) == ("blocks", 2)
    fusegpt(toy, xs, remove=1, epochs=0)
    assert len(toy.blocks) == 3
    assert applied_transforms(toy)[-1]["spec"]["removed"] == [["blocks", 2]]


def test_group_placement():
    # official placement: `size` blocks around the removed one, the removed one included
    assert _group(0, 12, 8) == list(range(0, 8))
    assert _group(5, 12, 8) == list(range(1, 9))      # 3 before the block before it, 3 after it
    assert _group(11, 12, 8) == list(range(4, 12))
    assert _group(1, 3, 8) == [0, 1, 2]


@pytest.mark.parametrize("name", ["swin_demo", "t2t_vit_demo"])
def test_fewer_blocks_and_exact_params(name, tmp_path):
    m = build(name)
    xs = images(m)
    blocks_before = {p: len(l) for p, l in removable_blocks(m).items()}
    out = fusegpt(copy.deepcopy(m), xs, remove=2, epochs=2, rank=4, lora_rank=4)
    removed = applied_transforms(out)[0]["spec"]["removed"]
    # blocks of a list are structurally equal: each removal drops one block's parameters exactly
    per_block = {p: n_params(l[0]) for p, l in removable_blocks(m).items()}
    assert n_params(out) == n_params(m) - sum(per_block[p] for p, _ in removed)
    assert not any(isinstance(mod, FuseLinear) for mod in out.modules())
    total_before = sum(blocks_before.values())
    total_after = sum(len(out.get_submodule(p)) for p in blocks_before)
    assert total_after == total_before - 2
    size = m.img_size if isinstance(m.img_size, int) else m.img_size[0]
    assert formers.count_flops(out, (3, size, size)) < formers.count_flops(m, (3, size, size))
    # the fine-tune moved the fused group, and the saved file rebuilds it
    path = str(tmp_path / "f.safetensors")
    save(out, path, metadata={"img_size": size, "num_classes": 10})
    with torch.no_grad():
        assert torch.equal(load(path).eval()(xs[0]), out(xs[0]))


def test_fusion_recovers_the_group_output_better_than_removal():
    m = build("t2t_vit_demo", seed=1)
    xs = images(m, n=4, bs=8)
    logs = {}
    for fuse in (False, True):
        torch.manual_seed(0)
        log = []
        fusegpt(copy.deepcopy(m), xs, remove=1, fuse=fuse, epochs=6, rank=8, lora_rank=8, coef_lr=1e-2,
                log=log.append)
        logs[fuse] = (log[0]["loss_before"], log[0]["loss_after"])
    assert logs[True][0] == pytest.approx(logs[False][0], rel=1e-6)   # the same starting point
    assert logs[True][1] < 0.9 * logs[True][0]
    assert logs[True][1] < logs[False][1]


def test_cli_round_trip(tmp_path):
    m = build("swin_demo", seed=3)
    ckpt = str(tmp_path / "plain.safetensors")
    save(m, ckpt, metadata={"img_size": 32, "num_classes": 10})
    out = str(tmp_path / "fused.safetensors")
    rc = main(["transform", "fusegpt", "--model", "swin_demo", "--checkpoint", ckpt, "--dataset", "digits",
               "--calib-batches", "1", "--batch-size", "8", "--remove", "2", "--epochs", "1", "--out", out])
    assert rc == 0
    loaded = load(out).eval()
    removed = applied_transforms(loaded)[0]["spec"]["removed"]
    assert len(removed) == 2
    assert n_params(loaded) == n_params(m) - sum(n_params(m.get_submodule(p)[0]) for p, _ in removed)
    x = images(m, n=1)[0]
    with torch.no_grad():
        y = loaded(x)
    assert y.shape == (4, 10) and torch.isfinite(y).all()
    # reload: the same structure and weights give the same outputs
    path2 = str(tmp_path / "again.safetensors")
    save(loaded, path2, metadata={"img_size": 32, "num_classes": 10})
    with torch.no_grad():
        assert torch.equal(load(path2).eval()(x), y)


def test_gpt_learns_stdlib_text_and_loses_a_block():
    torch.manual_seed(0)
    corpus = stdlib_corpus(max_bytes=300_000, seed=0)
    assert len(corpus.train) + len(corpus.val) == 300_000 and corpus.files[1] >= 1
    again = stdlib_corpus(max_bytes=300_000, seed=0)
    assert torch.equal(corpus.val, again.val)
    m = GPT(context=32, dim=32, depth=3, num_heads=2)
    assert m.head.weight is m.tok_embed.weight
    g = torch.Generator().manual_seed(0)
    val = [random_windows(corpus.val, 16, 32, g) for _ in range(2)]
    with torch.no_grad():
        before = sum(float(m.loss(x, y)) for x, y in val) / 2
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(40):
        x, y = random_windows(corpus.train, 16, 32, g)
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(m.loss(x, y)) for x, y in val) / 2
    assert before > 5.0 and after < before - 1.0          # ln 256 = 5.55 at the start
    # causal: a later byte does not change earlier logits
    x = val[0][0][:2]
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 256
    with torch.no_grad():
        assert torch.equal(m(x)[:, :-1], m(x2)[:, :-1])
    n = n_params(m)
    block = n_params(m.blocks[0])
    fusegpt(m, [x for x, _ in val], remove=1, epochs=2, rank=4, lora_rank=4)
    assert len(m.blocks) == 2 and n_params(m) == n - block


def test_errors_name_the_model():
    with pytest.raises(TransformError, match="sparseformer_demo"):
        m = formers.create_model("sparseformer_demo", num_classes=10).eval()
        fusegpt(m, images(m, n=1, bs=2), remove=1)
    with pytest.raises(TransformError, match="Toy"):      # only one block left in the list
        fusegpt(Toy(depth=2).eval(), [torch.randn(1, 4, 8)], remove=2, epochs=0)
    with pytest.raises(TransformError, match="Toy"):
        fusegpt(Toy().eval(), [torch.randn(1, 4, 8)], remove=0)
    with pytest.raises(TransformError, match="Sequential"):
        fusegpt(nn.Sequential(nn.Linear(4, 4)), [torch.randn(1, 4)])
