"""Registry, checkpoint safety, FLOP counting and the command line."""
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import formers
from formers.checkpoint import CheckpointError
from formers.cli import main as cli_main
from formers.layers import Attention


def test_catalog_has_77_papers_with_their_models():
    papers = formers.list_papers()
    assert len(papers) == 77 and [p["id"] for p in papers] == list(range(1, 78))
    by_id = {p["id"]: p for p in papers}
    assert by_id[48]["title"].startswith("Swin Transformer")
    assert "swin_tiny_patch4_window7_224" in by_id[48]["models"]
    assert by_id[12]["models"] == []  # a survey: nothing to implement


def test_model_info_card():
    info = formers.model_info("swin_tiny_patch4_window7_224")
    assert info["arxiv"] == "2103.14030" and info["paper"] == 48 and info["params_m"] == "28"
    assert info["macs_g"] == 4.5 and info["top1"] == 81.2 and info["repo"] == "microsoft/Swin-Transformer"
    assert info["pretrained_cfg"]["input_size"] == (3, 224, 224)


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="swin_tiny_patch4_window7_224"):
        formers.create_model("swin_tiny_patch4_window7")


def test_list_models_pattern_and_none_kwargs_dropped():
    assert formers.list_models("swin_*_384") == ["swin_base_patch4_window12_384", "swin_large_patch4_window12_384"]
    with torch.device("meta"):
        m = formers.create_model("swin_tiny_patch4_window7_224", num_classes=None, drop_path_rate=None)
    assert m.num_classes == 1000


def test_bad_constructor_argument_is_a_clear_error():
    # timm's and Python's convention: an unknown keyword is a TypeError, and it names the keyword
    with pytest.raises(TypeError, match="swin_demo: unknown keyword 'no_such_argument'"):
        formers.create_model("swin_demo", no_such_argument=3)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        formers.create_model("swin_demo", checkpoint=str(path))


def test_truncated_checkpoints_are_detected(tmp_path):
    model = formers.create_model("swin_demo")
    for suffix, save in [(".pth", lambda p: torch.save(model.state_dict(), p)),
                         (".safetensors", lambda p: formers.save_checkpoint(model, p))]:
        path = str(tmp_path / ("w" + suffix))
        save(path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="corrupt|truncated|not a readable"):
            formers.create_model("swin_demo", checkpoint=path)


def test_other_num_classes_drops_the_head_and_keeps_the_rest(tmp_path):
    torch.manual_seed(0)
    src = formers.create_model("swin_demo", num_classes=10)
    path = str(tmp_path / "w.pth")
    torch.save({"model": src.state_dict()}, path)
    with pytest.warns(UserWarning, match="classifier"):
        dst = formers.create_model("swin_demo", num_classes=3, checkpoint=path)
    torch.testing.assert_close(dst.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert dst.head.weight.shape == (3, src.num_features)


def test_in_chans_adaptation_of_the_first_conv(tmp_path):
    src = formers.create_model("swin_demo")
    path = str(tmp_path / "w.safetensors")
    formers.save_checkpoint(src, path)
    gray = formers.create_model("swin_demo", in_chans=1, checkpoint=path)
    torch.testing.assert_close(gray.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))


def test_mismatched_checkpoint_is_reported(tmp_path):
    src = formers.create_model("swin_demo")
    sd = src.state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "w.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="1 missing .*norm.weight.*1 unexpected"):
        formers.create_model("swin_demo", checkpoint=path)


class _TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(32, num_heads=4)

    def forward(self, x):
        return self.attn(x)


def test_count_flops_counts_cpu_attention_like_meta():
    model = _TinyAttention()
    cpu = formers.count_flops(model, (50, 32))
    with torch.device("meta"):
        meta = formers.count_flops(_TinyAttention(), (50, 32))
    # qkv 50*32*96 + proj 50*32*32 + QK^T and AV 2*50*50*32 (MACs)
    expected = 50 * 32 * 96 + 50 * 32 * 32 + 2 * 50 * 50 * 32
    assert cpu == meta == expected


def test_cli_list_info_papers(capsys):
    assert cli_main(["list", "swin*"]) == 0
    out = capsys.readouterr().out
    assert "swin_tiny_patch4_window7_224" in out and "swin_large_patch4_window12_384" in out
    assert cli_main(["info", "swin_tiny_patch4_window7_224"]) == 0
    out = capsys.readouterr().out
    assert "2103.14030" in out
    line = next(l for l in out.splitlines() if "params (M)" in l).split()
    assert line[-2] == "28" and abs(float(line[-1]) - 28.29) < 0.01
    line = next(l for l in out.splitlines() if "GMACs" in l).split()
    assert line[-2] == "4.5" and abs(float(line[-1]) - 4.49) < 0.01
    assert cli_main(["papers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([l for l in out if l[:3].strip().isdigit() and l[3:5] == "  "]) == 77
    assert out[-1].endswith("of 77 papers implemented")


def test_cli_bad_name_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "formers.cli", "info", "no_such_model"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown model" in r.stderr


@pytest.mark.parametrize("name", ["swin_demo", "crossformer_demo", "cswin_demo"])
def test_cached_masks_from_inference_mode_do_not_break_training(name):
    """Masks/index tables are cached by size; one first built under inference_mode must still be
    usable when the same size is later trained (it failed with 'Inference tensors cannot be saved')."""
    model = formers.create_model(name, img_size=40).eval()   # 40: padded windows -> masks are built
    x = torch.randn(1, 3, 40, 40)
    with torch.inference_mode():
        ref = model(x)
    model.train()
    model(x).sum().backward()
    assert torch.isfinite(ref).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_release_state_dict_opens_wrappers_and_drops_module_prefix():
    from formers.checkpoint import release_state_dict
    t = torch.zeros(1)
    assert release_state_dict({"model": {"module.a.weight": t, "b": t}, "epoch": 3}) == {"a.weight": t, "b": t}
    assert list(release_state_dict({"state_dict_ema": {"module.x": t}})) == ["x"]
    ours = {"stages.0.weight": t, "head.bias": t}
    assert release_state_dict(ours) == ours
