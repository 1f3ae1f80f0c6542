"""The LRA model over every registered mechanism: runs, learns nothing from padding, task configs."""
import math

import pytest
import torch
import torch.nn.functional as F

from formers.attention import attention_class, list_attentions
from formers.lra.cli import lr_factor
from formers.lra.model import TASK_CONFIGS, build_model, sinusoidal_table, task_config

ATTENTIONS = list_attentions()


@pytest.mark.parametrize("name", ATTENTIONS)
def test_every_attention_trains_and_ignores_padding(name):
    torch.manual_seed(0)
    model = build_model("listops", name, vocab_size=16, max_len=48, num_classes=10, scale=0.0625, depth=2)
    x = torch.randint(1, 16, (3, 48))
    x[1, 30:] = 0
    x[2, 9:] = 0
    loss = F.cross_entropy(model(x, x != 0), torch.tensor([1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        full = model(x, x != 0)
        for i, n in ((1, 30), (2, 9)):
            alone = model(x[i:i + 1, :n], torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(full[i], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_two_tower_retrieval_and_mean_pooling(name):
    torch.manual_seed(0)
    pair = build_model("retrieval", name, vocab_size=257, max_len=40, num_classes=2, scale=0.125, depth=1).eval()
    x = torch.randint(1, 257, (2, 2, 40))
    x[0, 1, 25:] = 0
    with torch.no_grad():
        out = pair(x, x != 0)
        swapped = pair(x.flip(1), x.flip(1) != 0)
        # a shared encoder: document 2 of the pair alone gives the same features as inside the pair
        u = pair.encoder(x[0, 1:, :25], torch.ones(1, 25, dtype=torch.bool))
        both = pair.encoder(x[0], x[0] != 0)
    assert out.shape == (2, 2) and not torch.allclose(out, swapped)   # [u, v, u*v, u-v] is ordered
    # a mixer that only looks back would never inform a prepended CLS token: the model mean-pools instead
    assert pair.cfg.pool == ("mean" if getattr(attention_class(name), "causal_only", False) else "cls")
    torch.testing.assert_close(both[1], u[0], atol=1e-4, rtol=1e-4)
    pf = build_model("pathfinder32", name, vocab_size=256, max_len=64, num_classes=2).eval()
    assert pf.encoder.cls is None and pf.cfg.pool == "mean"
    assert pf(torch.randint(0, 256, (2, 64))).shape == (2, 2)


def test_task_configs_follow_the_repo():
    c = TASK_CONFIGS["listops"]
    assert (c.depth, c.heads, c.dim, c.mlp_dim, c.pool, c.batch_size, c.lr, c.warmup) == (4, 8, 512, 1024, "cls", 32, 0.05, 1000)
    c = TASK_CONFIGS["image"]
    assert (c.depth, c.heads, c.dim, c.mlp_dim, c.dropout, c.schedule) == (1, 1, 32, 64, 0.3, "cosine")
    c = TASK_CONFIGS["pathfinder32"]
    assert (c.pool, c.pos, c.batch_size) == ("mean", "sinusoidal", 512)
    assert TASK_CONFIGS["pathfinder128"].pos == "learned" and TASK_CONFIGS["pathfinder128"].grad_clip == 1.0
    small = task_config("text", scale=0.25)
    assert small.dim == 64 and small.mlp_dim == 256 and small.dim % small.heads == 0
    with pytest.raises(ValueError):
        task_config("mnist")
    # the full ListOps model: 4 pre-norm blocks of width 512 (qkv, proj, MLP 1024, two norms), token
    # embedding, zero CLS, 2001 learned positions, final norm, head 512 -> 1024 -> 10
    with torch.device("meta"):
        m = build_model("listops", "softmax", 16, 2000, 10)
    d, h = 512, 1024
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + 2 * 2 * d
    expected = 16 * d + d + 2001 * d + 4 * block + 2 * d + (d * h + h) + (h * 10 + 10)
    assert sum(p.numel() for p in m.parameters()) == expected

def test_sinusoidal_positions_and_schedules():
    t = sinusoidal_table(10, 8)
    assert torch.allclose(t[:, 0], torch.sin(torch.arange(10.0))) and torch.allclose(t[0, 1::2], torch.ones(4))
    # rsqrt: the peak is base / sqrt(config warmup) whatever the (shortened) warmup
    peak = max(lr_factor(s, 300, 30, "rsqrt", 1000) for s in range(300))
    assert math.isclose(peak, 1 / math.sqrt(1000), rel_tol=1e-9)
    assert lr_factor(299, 300, 30, "rsqrt", 1000) < peak / 3
    assert math.isclose(max(lr_factor(s, 100, 10, "cosine", 1) for s in range(100)), 1.0)
    assert lr_factor(99, 100, 10, "cosine", 1) == 0.0
