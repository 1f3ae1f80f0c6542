"""Checkpoint files as users meet them: EMA-only releases, save_pretrained folders, path objects,
malformed state dicts, digests, damaged or mistaken files (formers.checkpoint)."""
import json
import os
import pathlib
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import formers
from formers.checkpoint import (DIGEST_KEY, CheckpointError, load_checkpoint, read_state_dict,
                                release_state_dict, save_checkpoint, save_pretrained, tensors_sha256)


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return formers.create_model("swin_demo").eval()


def _perturbed(sd, by=1.0):
    return {k: v + by if v.is_floating_point() else v for k, v in sd.items()}


# ---------------------------------------------------------------- 1. EMA-only layouts, one walk

@pytest.mark.parametrize("key", ["state_dict_ema", "model_ema"])
def test_ema_only_release_loads_its_ema_weights(demo, tmp_path, key):
    path = tmp_path / "ema_only.pth"
    torch.save({key: demo.state_dict(), "epoch": 300}, path)
    model = formers.create_model("swin_demo", checkpoint=str(path))
    for k, v in demo.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_use_ema_picks_the_ema_entry_and_plain_weights_win_otherwise(demo, tmp_path):
    plain, ema = demo.state_dict(), _perturbed(demo.state_dict())
    path = tmp_path / "both.pth"
    torch.save({"model": plain, "model_ema": ema}, path)
    key = "patch_embed.proj.weight"
    assert torch.equal(read_state_dict(path)[key], plain[key])
    assert torch.equal(read_state_dict(path, use_ema=True)[key], ema[key])
    model = formers.create_model("swin_demo")
    load_checkpoint(model, path, use_ema=True)
    assert torch.equal(model.state_dict()[key], ema[key])


@pytest.mark.parametrize("layout", ["bare", "model", "nested", "ema_only", "module_prefix", "both"])
def test_release_state_dict_and_read_state_dict_walk_the_same_way(demo, tmp_path, layout):
    sd = demo.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    obj = {"bare": sd, "model": {"model": sd, "epoch": 3}, "nested": {"model": {"state_dict": sd}},
           "ema_only": {"state_dict_ema": prefixed}, "module_prefix": {"state_dict": prefixed},
           "both": {"state_dict_ema": _perturbed(sd), "state_dict": sd}}[layout]
    torch.save(obj, tmp_path / "w.pth")
    from_file, in_memory = read_state_dict(tmp_path / "w.pth"), release_state_dict(obj)
    assert sorted(from_file) == sorted(in_memory) == sorted(sd)
    assert all(torch.equal(from_file[k], in_memory[k]) and torch.equal(from_file[k], sd[k]) for k in sd)


# ---------------------------------------------------------------- 2. save_pretrained folders

def test_save_pretrained_writes_a_hub_folder_that_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    src = formers.create_model("swin_demo", num_classes=7, in_chans=1, img_size=48).eval()
    folder = formers.save_pretrained(src, tmp_path / "folder")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["architecture"] == "swin_demo"
    assert config["model_args"] == {"num_classes": 7, "in_chans": 1, "img_size": 48}
    assert config["pretrained_cfg"]["input_size"] == [1, 48, 48] and config["pretrained_cfg"]["num_classes"] == 7
    assert config["card"]["arxiv"] == formers.model_info("swin_demo")["arxiv"]
    again = formers.create_model("swin_demo", checkpoint=tmp_path / "folder").eval()
    assert (again.num_classes, again.in_chans) == (7, 1)
    x = torch.randn(2, 1, 48, 48)
    torch.testing.assert_close(again(x), src(x), atol=0, rtol=0)
    assert again.checkpoint_verified is True
    fresh = formers.create_model("swin_demo", num_classes=7, in_chans=1, img_size=48)
    load_checkpoint(fresh, str(tmp_path / "folder"))
    torch.testing.assert_close(fresh.eval()(x), src(x), atol=0, rtol=0)


def test_save_pretrained_folder_keywords_yield_to_the_callers(tmp_path):
    src = formers.create_model("swin_demo", num_classes=7)
    save_pretrained(src, tmp_path / "f")
    with pytest.warns(UserWarning, match="classifier"):
        model = formers.create_model("swin_demo", num_classes=3, checkpoint=tmp_path / "f")
    assert model.num_classes == 3
    torch.testing.assert_close(model.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_save_pretrained_folder_of_another_architecture_is_refused(tmp_path):
    save_pretrained(formers.create_model("swin_demo"), tmp_path / "f")
    with pytest.raises(ValueError, match=r"cswin_demo.*holds weights of 'swin_demo'"):
        formers.create_model("cswin_demo", checkpoint=str(tmp_path / "f"))


def test_save_pretrained_records_extra_constructor_keywords(tmp_path):
    src = formers.create_model("swin_demo", num_classes=5, drop_path_rate=0.05)
    save_pretrained(src, tmp_path / "f", model_args={"drop_path_rate": 0.05})
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["model_args"]["drop_path_rate"] == 0.05
    assert formers.create_model("swin_demo", checkpoint=tmp_path / "f").num_classes == 5


# ---------------------------------------------------------------- 3. paths and malformed state dicts

def test_pathlib_paths_work_everywhere(demo, tmp_path):
    path = tmp_path / "w.safetensors"
    save_checkpoint(demo, path)
    assert sorted(read_state_dict(path)) == sorted(demo.state_dict())
    model = load_checkpoint(formers.create_model("swin_demo"), path)
    assert torch.equal(model.head.weight, demo.head.weight)
    model = formers.create_model("swin_demo", checkpoint=path)
    assert torch.equal(model.head.weight, demo.head.weight)
    torch.save({"model": demo.state_dict()}, tmp_path / "w.pth")
    assert torch.equal(formers.create_model("swin_demo", checkpoint=tmp_path / "w.pth").head.weight, demo.head.weight)
    assert os.path.isfile(save_pretrained(demo, tmp_path / "dir") + "/model.safetensors")


def test_non_string_keys_are_a_clear_error(demo, tmp_path):
    sd = dict(demo.state_dict())
    sd[0] = torch.zeros(3)
    path = tmp_path / "intkeys.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"intkeys\.pth.*key 0 is a int, not a parameter name"):
        formers.create_model("swin_demo", checkpoint=path)


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.zeros(5)], ids=["scalar", "1d"])
@pytest.mark.parametrize("key", ["patch_embed.proj.weight", "head.weight", "layers.0.blocks.0.norm1.weight"])
def test_a_tensor_of_the_wrong_rank_names_file_key_and_shapes(demo, tmp_path, key, bad):
    sd = dict(demo.state_dict())
    expected = tuple(sd[key].shape)
    sd[key] = bad
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        formers.create_model("swin_demo", checkpoint=path)
    msg = str(info.value)
    assert "bad.pth" in msg and key in msg and str(expected) in msg and str(tuple(bad.shape)) in msg, msg


def test_classifier_and_first_conv_adaptations_still_work(demo, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(demo.state_dict(), path)
    with pytest.warns(UserWarning, match="classifier"):
        model = formers.create_model("swin_demo", num_classes=4, in_chans=1, checkpoint=path)
    assert model.head.weight.shape == (4, demo.num_features)
    torch.testing.assert_close(model.patch_embed.proj.weight, demo.patch_embed.proj.weight.sum(1, keepdim=True))


# ---------------------------------------------------------------- 4. digests

def test_saved_weights_carry_a_digest_that_is_verified(demo, tmp_path):
    path = tmp_path / "w.safetensors"
    save_checkpoint(demo, path)
    with safe_open(str(path), "pt") as f:
        recorded = f.metadata()[DIGEST_KEY]
    assert recorded == tensors_sha256(demo.state_dict())
    assert recorded == tensors_sha256(dict(reversed(list(demo.state_dict().items()))))   # order-free
    assert recorded != tensors_sha256(_perturbed(demo.state_dict(), 1e-3))
    model = load_checkpoint(formers.create_model("swin_demo"), path)
    assert model.checkpoint_verified is True


def test_a_flipped_byte_in_a_tensor_is_reported_as_damage(demo, tmp_path):
    path = tmp_path / "w.safetensors"
    save_checkpoint(demo, path)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01                     # inside the last tensor: the file still parses
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"w\.safetensors.* is damaged"):
        formers.create_model("swin_demo", checkpoint=path)


def test_files_without_a_digest_load_and_say_they_are_not_verified(demo, tmp_path):
    save_file({k: v.contiguous() for k, v in demo.state_dict().items()}, str(tmp_path / "foreign.safetensors"))
    torch.save({"model": demo.state_dict()}, tmp_path / "release.pth")
    for name in ("foreign.safetensors", "release.pth"):
        model = load_checkpoint(formers.create_model("swin_demo"), tmp_path / name)
        assert model.checkpoint_verified is False
        assert torch.equal(model.head.weight, demo.head.weight)


def test_trainer_weights_carry_the_digest(tmp_path):
    from formers.train.trainer import _Run
    trainer = _Run.__new__(_Run)             # only _save_weights is exercised
    trainer.img_size, trainer.in_chans, trainer.mean, trainer.std = 32, 3, [0.5] * 3, [0.5] * 3
    trainer.progress = {"step": 3}
    from formers.tasks import get_task
    trainer.task = get_task("classify")

    class _Cfg:
        model_kwargs, dataset, out = {}, "digits", str(tmp_path)

    class _Data:
        classes = ["a"]

    trainer.cfg, trainer.data = _Cfg(), _Data()
    model = formers.create_model("swin_demo")
    path = trainer._save_weights(model, "best.safetensors", "model", 1, 50.0)
    with safe_open(path, "pt") as f:
        assert f.metadata()[DIGEST_KEY] == tensors_sha256(model.state_dict())


@pytest.mark.parametrize("kind", ["ours", "foreign"])
def test_formers_eval_says_whether_the_weights_were_verified(tmp_path, capsys, kind):
    from formers.train import run_eval
    model = formers.create_model("swin_demo", num_classes=10, in_chans=1, img_size=32)
    path = tmp_path / "w.safetensors"
    if kind == "ours":
        save_checkpoint(model, path, metadata={"img_size": 32, "in_chans": 1})
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    run_eval("swin_demo", str(path), "digits", img_size=32, limit_test=8, device="cpu")
    lines = capsys.readouterr().out.splitlines()
    want = ("weights verified (sha256)" if kind == "ours"
            else "weights not verifiable (no digest: an official release or foreign file)")
    assert lines.count(want) == 1, lines


# ---------------------------------------------------------------- 5. what a file is, in one true line

def test_safetensors_under_a_pth_name_loads(demo, tmp_path):
    save_checkpoint(demo, tmp_path / "w.safetensors")
    os.replace(tmp_path / "w.safetensors", tmp_path / "w.pth")
    model = formers.create_model("swin_demo", checkpoint=tmp_path / "w.pth")
    assert torch.equal(model.head.weight, demo.head.weight) and model.checkpoint_verified


@pytest.mark.parametrize("name,data,message", [
    ("random.pth", bytes(range(7, 256)) * 20, "not a PyTorch checkpoint or safetensors file"),
    ("notes.pth", b"these are my notes, not weights\n", "not a PyTorch checkpoint or safetensors file"),
    ("empty.pth", b"", "is empty"),
    ("config.json", b'{"lr": 0.1}', "is a JSON file, not weights"),
    ("garbled.pth", b"\x80\x02" + bytes(range(50, 90)), "corrupt or truncated"),
])
def test_damaged_or_mistaken_files_are_named_for_what_they_are(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as info:
        formers.create_model("swin_demo", checkpoint=tmp_path / name)
    assert "needs code" not in str(info.value) and "\n" not in str(info.value)


def test_a_zip_archive_that_is_not_a_torch_file_is_named(tmp_path):
    import zipfile
    with zipfile.ZipFile(tmp_path / "archive.pth", "w") as z:
        z.writestr("readme.txt", "no weights here")
    with pytest.raises(CheckpointError, match="is a zip archive but not a PyTorch checkpoint"):
        formers.create_model("swin_demo", checkpoint=tmp_path / "archive.pth")


def test_a_training_step_json_points_to_resume(tmp_path):
    path = tmp_path / "step-00000040.json"
    path.write_text(json.dumps({"format": "formers-train-state/1", "step": 40, "tensors": "step-00000040.safetensors"}))
    with pytest.raises(CheckpointError, match=r"training checkpoint \(step 40\).*step-00000040\.safetensors.*--resume"):
        formers.create_model("swin_demo", checkpoint=path)


def test_a_training_step_tensors_file_points_to_resume(tmp_path):
    save_file({"model/head.weight": torch.zeros(2, 2), "optim/x": torch.zeros(1)}, str(tmp_path / "step-00000040.safetensors"))
    with pytest.raises(CheckpointError, match=r"training checkpoint.*step-00000040\.json.*--resume"):
        formers.create_model("swin_demo", checkpoint=tmp_path / "step-00000040.safetensors")


class _Code:
    def __reduce__(self):
        return (os.getcwd, ())


def test_only_a_pickle_that_imports_code_is_said_to_need_code(tmp_path):
    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"model": _Code()}, f)
    with pytest.raises(CheckpointError, match=r"refusing .*needs code.*imports (posix|nt)\.getcwd"):
        formers.create_model("swin_demo", checkpoint=tmp_path / "code.pth")


def test_a_directory_is_called_a_directory(demo, tmp_path):
    torch.save(demo.state_dict(), tmp_path / "inside.pth")
    with pytest.raises(CheckpointError, match=r"is a directory, not a weights file.*inside\.pth"):
        formers.create_model("swin_demo", checkpoint=tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        formers.create_model("swin_demo", checkpoint=tmp_path / "nothing.pth")


def test_formers_eval_reads_a_save_pretrained_folder_and_names_a_plain_directory(tmp_path, capsys):
    from formers.cli import main
    model = formers.create_model("swin_demo", num_classes=10, in_chans=1, img_size=32)
    save_pretrained(model, tmp_path / "folder")
    args = ["--dataset", "digits", "--img-size", "32", "--limit-test", "8", "--out", str(tmp_path / "out")]
    assert main(["eval", "swin_demo", "--checkpoint", str(tmp_path / "folder"), *args]) == 0
    assert "weights verified (sha256)" in capsys.readouterr().out.splitlines()
    (tmp_path / "plain").mkdir()
    assert main(["eval", "swin_demo", "--checkpoint", str(tmp_path / "plain"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a directory, not a weights file" in err and len(err.splitlines()) == 1, err


class _Tied(torch.nn.Module):
    """Tied weights (one tensor under two names) and two slices of one buffer."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight
        whole = torch.arange(8.0)
        self.register_buffer("lo", whole[:4])
        self.register_buffer("hi", whole[4:])


def test_tied_and_sliced_tensors_round_trip_with_their_digest(tmp_path):
    src = _Tied()
    save_checkpoint(src, tmp_path / "t.safetensors")
    dst = _Tied()
    torch.nn.init.zeros_(dst.a.weight)
    dst.lo.zero_()
    load_checkpoint(dst, tmp_path / "t.safetensors")
    assert dst.checkpoint_verified and dst.b.weight is dst.a.weight
    assert torch.equal(dst.a.weight, src.a.weight) and torch.equal(dst.hi, torch.arange(4.0, 8.0))
    assert torch.equal(dst.lo, torch.arange(4.0))


def test_saving_a_meta_model_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        model = formers.create_model("swin_demo")
    with pytest.raises(CheckpointError, match="meta device"):
        save_checkpoint(model, tmp_path / "m.safetensors")
