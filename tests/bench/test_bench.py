"""The benchmark harness: figures, the timm peer check, CSV/plot outputs, machine limits, optimize().

No timing thresholds: the machine is shared, so only the presence, sign and internal consistency
of the figures are asserted.
"""
import csv
import json
import os
import time

import pytest
import torch
import torch.nn as nn

import formers
from formers.bench import BenchError, benchmark, csv_columns, machine_limits
from formers.bench import harness
from formers.bench.harness import MemoryMeter
from formers.bench.optimize import TOLERANCE, compare_outputs, conv_mac_fraction
from formers.cli import main as cli_main

FAST = dict(min_time=0.05, repeats=2, warmup=1, threads=1)
# a small Swin-T (timm has swin_tiny_patch4_window7_224; the same kwargs shrink both)
SMALL_SWIN = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4)
SMALL_SWIN_ARGS = ["--model-kwargs", "embed_dim=32", "depths=(2,2,2)", "num_heads=(1,2,4)", "window_size=4"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    # machine limits go to a private cache, never to the user's ~/.cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _numeric_columns(modes):
    text = {"model", "impl", "precision", "compiled", "optimized", "peer", "device"}
    return [c for c in csv_columns(modes) if c not in text and not c.endswith("_ratio")]


def test_tiny_model_all_figures_positive_and_consistent():
    threads = torch.get_num_threads()
    rows = benchmark("swin_demo", img_size=32, batch_size=2, mode="both", **FAST)
    assert torch.get_num_threads() == threads  # the thread count is restored
    assert len(rows) == 1
    r = rows[0]
    for col in _numeric_columns(("infer", "train")):
        assert isinstance(r[col], (int, float)) and r[col] > 0, (col, r[col])
    assert r["impl"] == "formers" and r["peer"] == "" and r["infer_ratio"] is None
    assert r["infer_img_size"] == 32 and r["infer_batch_size"] == 2 and r["threads"] == 1
    # GMACs are count_flops of one image; a train step counts 3x the forward
    with torch.device("meta"):
        meta = formers.create_model("swin_demo")
    macs = formers.count_flops(meta, (3, 32, 32)) / 1e9
    assert r["infer_gmacs"] == pytest.approx(macs, rel=1e-3)
    assert r["train_gmacs"] == pytest.approx(3 * macs, rel=1e-3)
    params = sum(p.numel() for p in meta.parameters()) / 1e6
    assert r["param_count"] == pytest.approx(params, rel=1e-3)
    for m in ("infer", "train"):
        ips = r[f"{m}_samples_per_sec"]
        assert r[f"{m}_step_time"] == pytest.approx(1000 * 2 / ips, rel=1e-3)
        assert r[f"{m}_gflops_per_s"] == pytest.approx(2 * r[f"{m}_gmacs"] * ips, rel=1e-3)


def test_peer_timm_same_weights_checked_then_interleaved(monkeypatch):
    seen = {}

    def prepare(ours, peer):
        seen["ours"], seen["peer"] = ours, peer

    order = []
    real = harness.time_interleaved

    def spy(steps, *args, **kwargs):
        order.append(list(steps))
        return real(steps, *args, **kwargs)

    monkeypatch.setattr(harness, "time_interleaved", spy)
    logs = []
    rows = benchmark("swin_tiny_patch4_window7_224", peer="timm", img_size=64, batch_size=2,
                     model_kwargs=SMALL_SWIN, prepare=prepare, log=logs.append, **FAST)
    import timm
    assert isinstance(seen["peer"], timm.models.SwinTransformer)
    # the same weights: timm's head.fc is our head, the patch embedding is shared by name
    assert torch.equal(seen["ours"].head.weight, seen["peer"].head.fc.weight)
    assert torch.equal(seen["ours"].patch_embed.proj.weight, seen["peer"].patch_embed.proj.weight)
    assert any("outputs equal to timm's" in line for line in logs)
    assert order == [["formers", "timm"]]
    ours, peer = rows
    assert (ours["impl"], peer["impl"]) == ("formers", "timm") and ours["peer"] == "timm"
    assert ours["infer_ratio"] == pytest.approx(ours["infer_samples_per_sec"] / peer["infer_samples_per_sec"],
                                                rel=2e-3)
    assert peer["infer_ratio"] is None
    assert ours["param_count"] == peer["param_count"] and ours["infer_gmacs"] == pytest.approx(peer["infer_gmacs"])
    for col in _numeric_columns(("infer",)):
        assert peer[col] > 0, col


def test_peer_timing_alternates_who_goes_first():
    calls = []
    steps = {"formers": lambda: calls.append("formers"), "timm": lambda: calls.append("timm")}
    timing = harness.time_interleaved(steps, torch.device("cpu"), min_time=1e-9, repeats=4, warmup=1)
    assert calls == ["formers", "timm"] + ["formers", "timm", "timm", "formers"] * 2
    assert all(len(t.step_s) == 4 and len(t.peak) == 4 for t in timing.values())


def test_peer_mismatch_aborts_before_timing(monkeypatch):
    def perturb(ours, peer):
        with torch.no_grad():
            ours.layers[1].blocks[0].mlp.fc1.weight[0, 0] += 0.5

    def no_timing(*args, **kwargs):
        raise AssertionError("timed models whose outputs differ")

    monkeypatch.setattr(harness, "time_interleaved", no_timing)
    with pytest.raises(BenchError, match="differ from the peer's by .* not timing"):
        benchmark("swin_tiny_patch4_window7_224", peer="timm", img_size=64, batch_size=2,
                  model_kwargs=SMALL_SWIN, prepare=perturb, **FAST)


def test_peer_errors_are_clear(monkeypatch):
    with pytest.raises(BenchError, match="has no model 'swin_demo'"):
        benchmark("swin_demo", peer="timm", **FAST)
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # as if timm were not installed
    with pytest.raises(BenchError, match="needs the timm package"):
        benchmark("swin_demo", peer="timm", **FAST)
    with pytest.raises(BenchError, match="unknown peer"):
        benchmark("swin_demo", peer="vit-pytorch", **FAST)


def test_filter_fn_that_does_not_map_is_reported(monkeypatch):
    import formers.models.swin as swin
    monkeypatch.setattr(swin, "checkpoint_filter_fn", lambda sd, model: sd)  # leaves timm's head.fc
    with pytest.raises(BenchError, match="checkpoint_filter_fn does not map .* unexpected \\['head.fc"):
        benchmark("swin_tiny_patch4_window7_224", peer="timm", img_size=64, batch_size=2,
                  model_kwargs=SMALL_SWIN, **FAST)


def test_cli_table_and_csv_columns(tmp_path, capsys):
    out = tmp_path / "runs" / "b.csv"
    rc = cli_main(["bench", "swin_tiny_patch4_window7_224", "--peer", "timm", "--img-size", "64", "-b", "2",
                   *SMALL_SWIN_ARGS, "--min-time", "0.05", "--repeats", "2", "--warmup", "1", "--threads", "1",
                   "--out", str(out), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "ratio" in text and text.count("swin_tiny_patch4_window7_224") == 2
    with open(out) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    documented = ["model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                  "param_count", "infer_gmacs", "impl", "precision", "compiled", "optimized", "peer", "infer_ratio",
                  "infer_gflops_per_s", "infer_spread_pct", "infer_peak_mem_mb", "device", "threads"]
    assert reader.fieldnames == documented == csv_columns(("infer",))
    assert [r["impl"] for r in rows] == ["formers", "timm"]
    assert float(rows[0]["infer_ratio"]) > 0 and rows[1]["infer_ratio"] == ""
    assert rows[0]["precision"] == "fp32" and rows[0]["compiled"] == "False" and rows[0]["infer_img_size"] == "64"
    png = tmp_path / "runs" / "b.png"  # ours beside the peer's, next to the CSV
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_csv_columns_both_modes_follow_timm_then_ours():
    cols = csv_columns(("infer", "train"), peak=True)
    assert cols[:7] == ["model", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                        "param_count", "infer_gmacs"]
    assert cols[7:12] == ["train_img_size", "train_samples_per_sec", "train_step_time", "train_batch_size",
                          "train_gmacs"]
    assert "infer_frac_of_peak" in cols and "train_frac_of_peak" in cols and "train_ratio" in cols


def test_sweep_writes_csv_with_tokens_and_png(tmp_path):
    out = tmp_path / "sweep.csv"
    rc = cli_main(["bench", "swin_demo", "--sweep", "img-size=16,32", "-b", "2", "--min-time", "0.05",
                   "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out), "-q"])
    assert rc == 0
    png = tmp_path / "sweep_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with open(out) as f:
        rows = list(csv.DictReader(f))
    # swin_demo: patch 2, so stage 1 has (img / 2)^2 tokens
    assert [(r["infer_img_size"], r["tokens"]) for r in rows] == [("16", "64"), ("32", "256")]


def test_cli_usage_errors(capsys):
    assert cli_main(["bench"]) == 2
    assert "name at least one model" in capsys.readouterr().err
    assert cli_main(["bench", "swin_demo", "--sweep", "batch=1,2"]) == 2
    assert "--sweep takes img-size=" in capsys.readouterr().err
    assert cli_main(["bench", "swin_demo", "--optimize", "--mode", "train"]) == 2
    assert "inference path" in capsys.readouterr().err


def test_machine_limits_cached_and_frac_of_peak(tmp_path):
    assert machine_limits(measure=False) is None  # nothing cached yet
    limits = machine_limits(measure=True, n=128, min_time=0.01, repeats=1)
    assert limits["limit_gflops"]["fp32"] > 0 and limits["limit_gflops"]["bf16"] > 0
    assert {"mm_fp32", "mm_bf16", "onednn_fp32"} <= set(limits["gflops"])
    with open(tmp_path / "cache" / "formers" / "machine.json") as f:
        cache = json.load(f)
    assert limits["key"] in cache and f"threads={torch.get_num_threads()}" in limits["key"]
    assert machine_limits(measure=False) == cache[limits["key"]]  # reused, not re-measured
    row = benchmark("swin_demo", batch_size=2, limits=limits, **FAST)[0]
    assert row["infer_frac_of_peak"] == pytest.approx(row["infer_gflops_per_s"] / limits["limit_gflops"]["fp32"],
                                                      rel=1e-2)


def test_memory_meter_sees_a_64mb_buffer():
    with MemoryMeter(torch.device("cpu")) as meter:
        buf = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
        time.sleep(0.05)
        del buf
    assert meter.peak >= 60 * 2 ** 20


def test_optimize_fp32_keeps_outputs():
    model = formers.create_model("swin_demo").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    fast = formers.optimize(model, precision="fp32", example_input=x)
    assert not fast.channels_last and fast.precision == "fp32"  # attention and linears dominate Swin
    out = fast(x)
    assert (out - ref).abs().max() <= 1e-4
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the original still computes the same


def test_optimize_bf16_within_tolerance():
    model = formers.create_model("swin_demo").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    fast = formers.optimize(model, precision="bf16", example_input=x)
    out = fast(x)
    assert out.dtype == torch.float32
    ok, err, tol = compare_outputs(out, ref, "bf16")
    assert ok and 0 < err and tol == TOLERANCE["bf16"] * max(1.0, ref.abs().max().item())
    assert err > 1e-4  # it really ran in bf16


def test_optimize_channels_last_for_a_conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    x = torch.randn(2, 3, 32, 32)
    assert conv_mac_fraction(net, x) > 0.9
    with torch.no_grad():
        ref = net.eval()(x)
    fast = formers.optimize(net, precision="fp32", example_input=x)
    assert fast.channels_last and net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (fast(x) - ref).abs().max() <= 1e-4


def test_optimize_rejects_bad_precision_and_reports_a_mismatch(monkeypatch):
    model = formers.create_model("swin_demo")
    with pytest.raises(ValueError, match="precision must be"):
        formers.optimize(model, precision="fp16")
    monkeypatch.setitem(TOLERANCE, "bf16", 1e-9)
    with pytest.raises(ValueError, match="outputs differ from the original"):
        formers.optimize(model, precision="bf16", example_input=torch.randn(1, 3, 32, 32))


def test_bench_times_the_optimized_path():
    rows = benchmark("swin_demo", batch_size=2, precision="bf16", optimized=True, **FAST)
    assert rows[0]["optimized"] is True and rows[0]["infer_samples_per_sec"] > 0


@pytest.mark.skipif(not os.environ.get("FORMERS_TEST_COMPILE"),
                    reason="torch.compile takes 10 s to minutes here; set FORMERS_TEST_COMPILE=1")
def test_optimize_compiled_with_freezing_keeps_outputs():
    model = formers.create_model("swin_demo")
    x = torch.randn(2, 3, 32, 32)
    fast = formers.optimize(model, precision="fp32", compile=True, example_input=x)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() <= 1e-4


def test_cli_kwargs_scoped_to_a_model():
    from formers.bench.cli import _kwargs
    items = ["window_size=4", "poolformer_s12:final_norm=layer", "depths=(2,2)", "act=gelu"]
    assert _kwargs(items, "swin_demo", "--x") == {"window_size": 4, "depths": (2, 2), "act": "gelu"}
    assert _kwargs(items, "poolformer_s12", "--x")["final_norm"] == "layer"
    with pytest.raises(BenchError, match=r"\[MODEL:\]KEY=VALUE"):
        _kwargs(["window_size"], "swin_demo", "--model-kwargs")


def test_model_file_timm_compat_kwargs_are_used_and_explicit_ones_win(monkeypatch):
    import formers.models.swin as swin
    monkeypatch.setattr(swin, "TIMM_COMPAT_KWARGS", {"swin_tiny_patch4_window7_224": {"drop_rate": 0.25}},
                        raising=False)
    seen = []
    for ours_kwargs in ({}, {"drop_rate": 0.5}):
        benchmark("swin_tiny_patch4_window7_224", peer="timm", img_size=64, batch_size=2, model_kwargs=SMALL_SWIN,
                  ours_kwargs=ours_kwargs, prepare=lambda ours, peer: seen.append(ours.pos_drop.p), **FAST)
    assert seen == [0.25, 0.5]


def test_peer_hf_segformer_same_weights_and_segmentation_train_step():
    """--peer hf: HF transformers' SegFormer from segformer.py's hf_peer, its weights mapped into ours (with
    HF_COMPAT_KWARGS' LayerNorm eps), outputs checked, then both timed in inference and a training step on
    random label maps."""
    pytest.importorskip("transformers")
    seen, logs = {}, []
    def prepare(ours, peer):   # before any timed (training) step changes the weights
        seen.update(eps=ours.encoder.stages[0].norm.eps, same=torch.equal(
            ours.head.classifier.weight, peer.model.decode_head.classifier.weight))
    rows = benchmark("segformer_b0", peer="hf", img_size=64, batch_size=2, mode="both", log=logs.append,
                     model_kwargs={"num_classes": 7}, prepare=prepare, **FAST)
    assert seen == {"eps": 1e-5, "same": True}       # HF's LayerNorm eps, so the two compute one function
    assert any("outputs equal to hf's" in line for line in logs)
    ours, peer = rows
    assert (ours["impl"], peer["impl"], ours["peer"]) == ("formers", "hf", "hf")
    for m in ("infer", "train"):
        assert ours[f"{m}_ratio"] == pytest.approx(ours[f"{m}_samples_per_sec"] / peer[f"{m}_samples_per_sec"],
                                                   rel=2e-3)
    assert ours["param_count"] == peer["param_count"]
    with pytest.raises(BenchError, match="no HF transformers counterpart"):
        benchmark("swin_demo", peer="hf", img_size=32, batch_size=1, **FAST)


def test_the_ablation_file_keeps_one_result_per_row_and_seed(tmp_path):
    """Two processes (other seeds, or a rerun) writing into one ablation folder keep each other's results."""
    from formers.bench.daformer_ablation import _merge, _table
    path = str(tmp_path / "ablation.json")
    run = lambda seed, best: {"seed": seed, "best": best, "last": best - 1}        # noqa: E731
    _merge(path, {}, {"DACS": [run(0, 10.0)], "source only": [run(0, 7.0)]})
    merged = _merge(path, {}, {"DACS": [run(1, 12.0), run(2, 14.0)]})
    merged = _merge(path, {}, {"DACS": [run(2, 11.0)]})                                # a rerun replaces seed 2
    assert [r["seed"] for r in merged["DACS"]] == [0, 1, 2] and merged["DACS"][2]["best"] == 11.0
    assert merged["source only"] == [run(0, 7.0)]
    table = _table(merged)
    assert "| DACS | 11.00 ± 1.00 | 10.00 | 10.00, 12.00, 11.00 |" in table and "seeds 0, 1, 2" in table
