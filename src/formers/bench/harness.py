"""Timing, memory and FLOP-rate of one model, or of ours and a peer's (timm, HF transformers) side by side.

How a figure is made:
- a step is one batch: inference is `model(x)` in eval mode under `torch.inference_mode()`;
  training is zero_grad + forward + cross-entropy on random targets + backward + SGD step
  (lr 1e-4), as timm's benchmark.py does. bf16 runs the forward under `torch.autocast`.
- after `warmup` steps, each of `repeats` timed loops runs steps until `min_time` seconds have
  passed; a loop gives images/s, and the figure is the median over loops, with their spread
  ((max - min) / median). With a peer, the loops of ours and the peer's alternate in one
  process (repeat r: ours then the peer's, repeat r+1: the peer's then ours), so a machine
  that slows down for a while slows both; ratio = our images/s / the peer's.
- peak memory is what a step needs beyond what was allocated when the loop began (weights,
  input, and in training the gradients left by the step before): on CPU the largest resident-set size seen by a thread that samples /proc/self/statm
  every 2 ms (freed heap is first returned to the system with malloc_trim), on CUDA
  torch.cuda.max_memory_allocated. The largest over the loops is reported.
- GMACs are counted (formers.count_flops, under no_grad) on the eager model for one image;
  a training step is counted as 3x the forward. GFLOP/s = 2 x MACs per image x images/s.
- a segmentation model's training step uses random label maps at its output's size.
- with a peer, the peer's model is built with the same name and image size (timm), or by our
  model file's `hf_peer(name, num_classes)` (HF transformers, e.g. SegFormer), its weights are
  mapped into ours through our model file's checkpoint_filter_fn and loaded strictly, and the
  two outputs must agree (fp32: 1e-4, bf16: 5e-2, relative to max(1, largest logit)) before
  anything is timed; otherwise BenchError.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import formers

from .optimize import TOLERANCE, compare_outputs, optimize

__all__ = ["BenchError", "benchmark", "sweep", "csv_columns", "MODES", "PRECISIONS"]

MODES = ("infer", "train")
PRECISIONS = ("fp32", "bf16")


class BenchError(ValueError):
    """A benchmark that cannot run as asked (missing peer, mismatched outputs, bad option)."""


# ----------------------------------------------------------------------------------------------
# memory


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


_PAGE = _page_size()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim():
    """Give freed heap back to the system so an RSS baseline is not inflated by a former run."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of a block beyond what it started with, in bytes (None where unknown)."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = _rss_bytes()
            if self._base is not None:
                self._max = self._base
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            self.peak = max(self._max, rss if rss is not None else 0) - self._base
        return False


# ----------------------------------------------------------------------------------------------
# models


def _image_size(model: nn.Module, img_size: int | None) -> int:
    if img_size:
        return img_size
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224)
    return int(size[-1])


def _stem_reduction(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None) or [{}]
    return int(info[0].get("reduction") or 1)  # None: a token set with no grid (SparseFormer)


PEERS = ("timm", "hf")


def timm_compat_kwargs(name: str, peer: str = "timm") -> dict:
    """Our create_model kwargs under which `name` computes what the peer's model computes.

    A model file whose variant deliberately differs from the peer's port (the official code and timm
    disagree; HF's SegFormer uses LayerNorm eps 1e-5 where the official code has 1e-6) declares them as
    `TIMM_COMPAT_KWARGS` / `HF_COMPAT_KWARGS` = {variant: {kwarg: value}}; --peer uses them (explicit
    ours_kwargs win).
    """
    from formers.registry import model_entry
    module = sys.modules.get(model_entry(name).module)
    table = "TIMM_COMPAT_KWARGS" if peer == "timm" else "HF_COMPAT_KWARGS"
    return dict(getattr(module, table, {}).get(name, {}))


class HFLogits(nn.Module):
    """An HF transformers model as a peer: forward(x) -> its `logits` (pixel_values in); its weights are
    the wrapped model's state dict, under the wrapped model's own names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits

    def peer_state_dict(self) -> dict:
        return self.model.state_dict()


def _build_hf(name: str, num_classes: int, model_kwargs: dict, device) -> nn.Module:
    from formers.registry import model_entry
    module = sys.modules.get(model_entry(name).module)
    build = getattr(module, "hf_peer", None)
    if build is None:
        raise BenchError(f"--peer hf: {name} has no HF transformers counterpart (its model file defines no hf_peer)")
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise BenchError(f"--peer hf needs the transformers package (a test dependency of formers: "
                         f"pip install 'formers[test]'); importing it failed: {e}") from None
    torch.manual_seed(1)
    kwargs = {k: v for k, v in model_kwargs.items() if k != "num_classes"}   # ours' count is passed
    return HFLogits(build(name, num_classes, **kwargs)).to(device)


def _build_ours(name: str, img_size: int | None, model_kwargs: dict, device) -> nn.Module:
    torch.manual_seed(0)
    return formers.create_model(name, img_size=img_size, **model_kwargs).to(device)


def _build_timm(name: str, img_size: int, num_classes: int, model_kwargs: dict, device) -> nn.Module:
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError as e:
        raise BenchError(f"--peer timm needs the timm package (a test dependency of formers: "
                         f"pip install 'formers[test]'); importing it failed: {e}") from None
    if not timm.is_model(name):
        close = timm.list_models(f"{name.split('_')[0]}*")[:6]
        hint = f"; timm has {', '.join(close)}" if close else ""
        raise BenchError(f"timm {timm.__version__} has no model {name!r} to compare with{hint}")
    kwargs = dict(model_kwargs, num_classes=num_classes)
    cfg = get_pretrained_cfg(name)
    default = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None
    if img_size != default:
        kwargs["img_size"] = img_size  # position tables / windows are sized at creation in timm
    torch.manual_seed(1)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError:
        if "img_size" not in kwargs:
            raise
        kwargs.pop("img_size")  # a convolutional model that takes any size and no img_size argument
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.to(device)


def load_peer_weights(ours: nn.Module, peer: nn.Module) -> None:
    """Load the peer's weights into ours through our model file's checkpoint_filter_fn (strict)."""
    module = sys.modules[type(ours).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    sd = peer.peer_state_dict() if hasattr(peer, "peer_state_dict") else peer.state_dict()
    mapped = filter_fn(sd, ours) if filter_fn is not None else sd
    own = ours.state_dict()
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own]
    shapes = [f"{k}: {tuple(v.shape)} vs ours {tuple(own[k].shape)}"
              for k, v in mapped.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        where = f"{module.__name__}.checkpoint_filter_fn" if filter_fn is not None else "(no checkpoint_filter_fn)"
        raise BenchError(
            f"{getattr(ours, 'model_name', type(ours).__name__)}: {where} does not map the peer's state dict onto "
            f"ours: {len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, "
            f"{len(shapes)} of another shape {shapes[:3]}")
    ours.load_state_dict(mapped, strict=True)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_outputs(ours: nn.Module, peer: nn.Module, x: torch.Tensor, precision: str, name: str) -> float:
    """Raise BenchError unless ours and the peer's eval outputs on x agree; return the max difference."""
    ours.eval()
    peer.eval()
    with torch.no_grad(), _autocast(precision, x.device):
        a = ours(x)
        b = peer(x)
    ok, err, tol = compare_outputs(a, b, precision)
    if not ok:
        raise BenchError(
            f"{name}: our outputs differ from the peer's by {err:.3g} (allowed {tol:.3g}: {TOLERANCE[precision]:g} "
            f"x max(1, largest peer logit), {precision}) with the same weights; not timing models that compute "
            f"different things")
    return err


# ----------------------------------------------------------------------------------------------
# steps and timing


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def make_step(model: nn.Module, mode: str, x: torch.Tensor, precision: str, compile: bool = False,
              optimized: bool = False, num_classes: int = 1000) -> Callable[[], None]:
    """A function that runs one benchmark step of `model` on batch `x`."""
    device = x.device
    if mode == "infer":
        model.eval()
        if optimized:
            # checked against the eager model (and compiled, if asked) on two images first
            fn = optimize(model, precision=precision, compile=compile, example_input=x[:2])

            def step():
                with torch.inference_mode():
                    fn(x)
            return step
        fn = torch.compile(model) if compile else model

        def step():
            with torch.inference_mode(), _autocast(precision, device):
                fn(x)
        return step
    if mode != "train":
        raise BenchError(f"unknown mode {mode!r}: infer or train")
    if num_classes <= 0:
        raise BenchError("a train step needs a classifier (num_classes > 0)")
    model.train()
    fn = torch.compile(model) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator(device=device).manual_seed(0)
    targets = {}

    def target(out):   # (B,) classes, or (B, h, w) label maps for a segmentation model's (B, K, h, w) scores
        shape = (out.shape[0],) + tuple(out.shape[2:])
        if shape not in targets:
            targets[shape] = torch.randint(0, num_classes, shape, device=device, generator=gen)
        return targets[shape]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            out = fn(x)
            out = out[0] if isinstance(out, (tuple, list)) else out   # an auxiliary head's scores are extra
            loss = loss_fn(out, target(out))
        loss.backward()
        optimizer.step()
    return step


@dataclass
class _Timing:
    step_s: list = field(default_factory=list)   # seconds per step, one per timed loop
    peak: list = field(default_factory=list)     # bytes, one per timed loop


def _timed_loop(step, min_time: float, sync) -> float:
    """Seconds per step over a loop of at least min_time seconds (at least one step)."""
    sync()
    n = 0
    t0 = time.perf_counter()
    while True:
        step()
        sync()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / n


def time_interleaved(steps: dict, device: torch.device, min_time: float, repeats: int, warmup: int) -> dict:
    """{impl: _Timing}: warm every step up, then alternate the timed loops of each impl."""
    sync = _sync_fn(device)
    for step in steps.values():
        for _ in range(max(warmup, 1)):  # at least one: the first call may compile
            step()
        sync()
    out = {k: _Timing() for k in steps}
    order = list(steps)
    for r in range(repeats):
        for impl in (order if r % 2 == 0 else order[::-1]):
            with MemoryMeter(device) as meter:
                out[impl].step_s.append(_timed_loop(steps[impl], min_time, sync))
            out[impl].peak.append(meter.peak)
    return out


def _sig(v: float, digits: int = 4):
    """Round to significant digits (tiny models have GMACs of 0.001)."""
    return float(f"{v:.{digits}g}")


# ----------------------------------------------------------------------------------------------
# the benchmark


def csv_columns(modes=("infer",), peak: bool = False, sweep: bool = False) -> list[str]:
    """The CSV columns of a run: timm's benchmark columns, mode-prefixed, then ours."""
    cols = ["model"] + (["tokens"] if sweep else [])
    for i, m in enumerate(modes):
        cols += [f"{m}_img_size", f"{m}_samples_per_sec", f"{m}_step_time", f"{m}_batch_size"]
        if i == 0:
            cols.append("param_count")
        cols.append(f"{m}_gmacs")
    cols += ["impl", "precision", "compiled", "optimized", "peer"]
    for m in modes:
        cols += [f"{m}_ratio", f"{m}_gflops_per_s", f"{m}_spread_pct", f"{m}_peak_mem_mb"]
        if peak:
            cols.append(f"{m}_frac_of_peak")
    return cols + ["device", "threads"]


def _modes(mode: str) -> tuple:
    if mode == "both":
        return MODES
    if mode not in MODES:
        raise BenchError(f"mode must be infer, train or both, got {mode!r}")
    return (mode,)


def benchmark(models, peer: str | None = None, batch_size: int = 8, img_size: int | None = None,
              precision: str = "fp32", mode: str = "infer", compile: bool = False, optimized: bool = False,
              threads: int | None = None, min_time: float = 2.0, repeats: int = 3, warmup: int = 3,
              device: str | None = None, model_kwargs: dict | None = None, ours_kwargs: dict | None = None,
              peer_kwargs: dict | None = None, limits: dict | None = None, prepare: Callable | None = None,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark each model (and the peer's model of the same name); one row per model and impl.

    `model_kwargs` go to both builders, `ours_kwargs` / `peer_kwargs` to one only (to align a
    documented difference, e.g. poolformer_s12's final norm: ours_kwargs=dict(final_norm='layer'));
    with peer='timm', the model file's TIMM_COMPAT_KWARGS for the variant come first.
    `limits` is `machine_limits()`'s record (adds frac_of_peak); `prepare(ours, peer)` is called
    after the peer's weights are loaded into ours and before the outputs are compared (a test hook).
    """
    if isinstance(models, str):
        models = [models]
    if precision not in PRECISIONS:
        raise BenchError(f"precision must be fp32 or bf16, got {precision!r}")
    if peer not in (None,) + PEERS:
        raise BenchError(f"unknown peer {peer!r}: the peer library can be {' or '.join(PEERS)}")
    modes = _modes(mode)
    if optimized and "train" in modes:
        raise BenchError("--optimize is an inference path: use it with --mode infer")
    if batch_size < 1 or repeats < 1 or min_time <= 0:
        raise BenchError("batch size and repeats must be >= 1 and min-time > 0")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = log or (lambda s: None)
    kwargs = ({**(model_kwargs or {}), **(ours_kwargs or {})}, {**(model_kwargs or {}), **(peer_kwargs or {})})
    rows = []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for name in models:
            rows += _bench_one(name, peer, batch_size, img_size, precision, modes, compile, optimized, min_time,
                               repeats, warmup, dev, kwargs, limits, prepare, log)
    finally:
        torch.set_num_threads(before)
    return rows


def _bench_one(name, peer, batch_size, img_size, precision, modes, compile, optimized, min_time, repeats, warmup,
               dev, kwargs, limits, prepare, log) -> list[dict]:
    ours_kw = {**timm_compat_kwargs(name, peer), **kwargs[0]} if peer else kwargs[0]
    ours = _build_ours(name, img_size, ours_kw, dev)
    size = _image_size(ours, img_size)
    in_chans = getattr(ours, "in_chans", 3)
    num_classes = getattr(ours, "num_classes", 1000)
    impls = {"formers": ours}
    gen = torch.Generator(device="cpu").manual_seed(0)
    if peer:
        if peer == "timm":
            other = _build_timm(name, size, num_classes, kwargs[1], dev)
        else:
            other = _build_hf(name, num_classes, kwargs[1], dev)
        load_peer_weights(ours, other)
        if prepare is not None:
            prepare(ours, other)
        check = torch.randn(min(batch_size, 2), in_chans, size, size, generator=gen).to(dev)
        err = check_outputs(ours, other, check, precision, name)
        log(f"{name} @ {size}px: outputs equal to {peer}'s (max |diff| {err:.2e}, {precision})")
        impls[peer] = other
    x = torch.randn(batch_size, in_chans, size, size, generator=gen).to(dev)
    macs = {k: formers.count_flops(m, (in_chans, size, size)) for k, m in impls.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in impls.items()}
    rows = {k: dict(model=name, impl=k, precision=precision, compiled=compile,
                    optimized=optimized and k == "formers", peer=peer or "", device=dev.type,
                    threads=torch.get_num_threads(), param_count=_sig(params[k] / 1e6),
                    tokens=getattr(ours, "num_latent_tokens", None) or (size // _stem_reduction(ours)) ** 2)
            for k in impls}
    limit = (limits or {}).get("limit_gflops", {}).get(precision)
    for m in modes:
        log(f"{name}: {m} x{batch_size} @ {size}px, {precision}{', compiled' if compile else ''}"
            f"{', optimized' if optimized else ''}: " + (" / ".join(impls) + " interleaved" if peer else "timing"))
        steps = {k: make_step(mdl, m, x, precision, compile, optimized and k == "formers", num_classes)
                 for k, mdl in impls.items()}
        timing = time_interleaved(steps, dev, min_time, repeats, warmup)
        rates = {}
        for k, t in timing.items():
            ips = [batch_size / s for s in t.step_s]
            med = statistics.median(ips)
            rates[k] = med
            gmacs = macs[k] / 1e9 * (3 if m == "train" else 1)
            peaks = [p for p in t.peak if p is not None]
            row = rows[k]
            row.update({
                f"{m}_img_size": size, f"{m}_samples_per_sec": _sig(med), f"{m}_step_time": _sig(1000 * batch_size / med),
                f"{m}_batch_size": batch_size, f"{m}_gmacs": _sig(gmacs),
                f"{m}_gflops_per_s": _sig(2 * gmacs * med),
                f"{m}_spread_pct": _sig(100 * (max(ips) - min(ips)) / med, 3),
                f"{m}_peak_mem_mb": _sig(max(peaks) / 2 ** 20) if peaks else None,
                f"{m}_ratio": None,
            })
            if limit:
                row[f"{m}_frac_of_peak"] = _sig(2 * gmacs * med / limit, 3)
        if peer:
            rows["formers"][f"{m}_ratio"] = _sig(rates["formers"] / rates[peer])
        del steps, timing
    return list(rows.values())


def sweep(models, img_sizes, **kwargs) -> list[dict]:
    """benchmark() at each image size (models are rebuilt per size); rows carry `tokens`,
    the number of tokens of the first stage, (img / stage-1 reduction)^2."""
    rows = []
    for size in img_sizes:
        rows += benchmark(models, img_size=int(size), **kwargs)
    return rows

