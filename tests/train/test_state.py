"""Optimizer groups, schedule, EMA, and checkpoints that round-trip exactly and detect damage."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

from formers.checkpoint import CheckpointError
from formers.train.optim import ModelEma, WarmupCosine, build_optimizer, param_groups
from formers.train.state import (capture_rng, find_latest, load_optimizer, load_train_state, optimizer_tensors,
                                 restore_rng, save_train_state)


def _tiny(tiny):
    import formers
    torch.manual_seed(0)
    return formers.create_model(tiny, num_classes=4, in_chans=1, img_size=8)


def test_weight_decay_excludes_1d_biases_and_no_weight_decay(tiny):
    m = _tiny(tiny)
    groups = param_groups(m, 0.05)
    decayed = dict(zip(groups[0]["param_names"], groups[0]["params"]))
    skipped = set(groups[1]["param_names"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "pos_embed" in skipped                         # named by Backbone.no_weight_decay(), 4-D
    assert "stem.0.bias" in skipped and "stem.1.weight" in skipped   # bias, GroupNorm scale
    assert set(decayed) == {"stem.0.weight", "stem.3.weight", "block.0.weight", "head.weight"}
    assert len(decayed) + len(skipped) == len(list(m.parameters()))


def test_warmup_cosine_shape():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = WarmupCosine(opt, total_steps=110, warmup_steps=10, min_ratio=0.01)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(110):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)                                   # peak after warmup
    assert lrs[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_ema_follows_with_warmup_decay(tiny):
    m = _tiny(tiny)
    ema = ModelEma(m, decay=0.9)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)                 # first decay min(0.9, 1/10) = 0.1
    w0 = dict(ModelEma(_tiny(tiny)).module.named_parameters())
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, w0[n] + 0.9, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def _train_steps(m, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()


def test_optimizer_state_round_trips_exactly(tiny, tmp_path):
    m = _tiny(tiny)
    opt = build_optimizer(m, 1e-2, 0.05)
    _train_steps(m, opt, 3, 0)
    tensors, meta = optimizer_tensors(opt)
    assert "optim/head.weight/exp_avg_sq" in tensors and "optim/pos_embed/step" in tensors
    json.dumps(meta)                                       # scalars are plain JSON
    m2 = _tiny(tiny)
    m2.load_state_dict(m.state_dict())
    opt2 = build_optimizer(m2, 1e-2, 0.05)
    from safetensors.torch import load, save
    load_optimizer(opt2, load(save(tensors)), json.loads(json.dumps(meta)))    # through the file formats
    m.eval(), m2.eval()
    _train_steps(m, opt, 2, 1)
    _train_steps(m2, opt2, 2, 1)
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


def test_rng_capture_restore():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    t, s = capture_rng()
    ref = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(t, json.loads(json.dumps(s)))
    assert torch.equal(torch.rand(3), ref[0])
    assert np.array_equal(np.random.rand(3), ref[1]) and random.random() == ref[2]


def _save(tmp_path, step, value=1.0, keep=2):
    return save_train_state(str(tmp_path), step, {"model/w": torch.full((64,), value), "model/s": torch.tensor(2.0)},
                            {"progress": {"step": step}}, keep=keep)


def test_train_state_round_trip_and_pruning(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, value=step)
    assert sorted(os.listdir(tmp_path)) == ["step-00000020.json", "step-00000020.safetensors",
                                            "step-00000030.json", "step-00000030.safetensors"]
    latest = find_latest(str(tmp_path))
    meta, tensors = load_train_state(latest)
    assert meta["step"] == 30 and torch.equal(tensors["model/w"], torch.full((64,), 30.0))
    assert len(meta["sha256"]) == 64 and meta["bytes"] == os.path.getsize(tmp_path / "step-00000030.safetensors")


def test_truncated_checkpoint_is_detected(tmp_path):
    path = _save(tmp_path, 5)
    st = tmp_path / "step-00000005.safetensors"
    st.write_bytes(st.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_train_state(path)


def test_flipped_byte_is_detected(tmp_path):
    path = _save(tmp_path, 5)
    st = tmp_path / "step-00000005.safetensors"
    blob = bytearray(st.read_bytes())
    blob[-3] ^= 0x10                     # inside a tensor: safetensors itself would not notice
    st.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_train_state(path)


def test_broken_json_is_detected(tmp_path):
    path = _save(tmp_path, 5)
    with open(path, "r+b") as f:
        f.truncate(30)
    with pytest.raises(CheckpointError, match="JSON does not parse"):
        load_train_state(path)


def test_clean_temp_removes_leftovers_of_a_kill(tmp_path):
    from formers.train.state import clean_temp
    _save(tmp_path, 8)
    (tmp_path / "step-00000012.safetensors").write_bytes(b"written, but its JSON never was")
    (tmp_path / "step-00000012.json.tmp123").write_bytes(b"{")
    clean_temp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["step-00000008.json", "step-00000008.safetensors"]
