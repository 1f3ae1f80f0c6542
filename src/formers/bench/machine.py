"""This machine's matmul limits, so a benchmark can say what fraction of them a model reaches.

Measured with square matmuls (2 n^3 FLOPs each) in fp32 and bf16, by two paths on the CPU:
- `torch.mm` (MKL on x86; on AMD chips MKL takes a generic path);
- oneDNN: `torch._C._nn.mkldnn_linear` on mkldnn-layout tensors (`Tensor.to_mkldnn()`), the
  kernel behind `torch.utils.mkldnn.to_mkldnn(nn.Linear)` and inductor's packed linears.
On CUDA, `torch.mm` in fp32 (TF32 off, torch's default) and bf16. The limit of a precision is
the best of its paths. Results are cached in ~/.cache/formers/machine.json ($XDG_CACHE_HOME
is honoured), keyed by the processor's name and the thread count (or the GPU's name).
"""
from __future__ import annotations

import json
import os
import platform
import time

import torch

__all__ = ["machine_limits", "measure_machine", "machine_key", "cache_path"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"cuda|{torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu|{_cpu_name()}|threads={torch.get_num_threads()}"


def cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "formers", "machine.json")


def _gflops(fn, flops: float, min_time: float, repeats: int, sync) -> float:
    """The best rate over `repeats` loops of at least `min_time` seconds each (a limit: best, not median)."""
    fn()
    fn()
    sync()
    best = 0.0
    for _ in range(repeats):
        n = 0
        t0 = time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        best = max(best, flops * n / elapsed / 1e9)
    return best


def measure_machine(device: str = "cpu", n: int = 2048, min_time: float = 0.5, repeats: int = 3) -> dict:
    """Measure fp32 and bf16 matmul GFLOP/s on `device` now (a few seconds)."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    flops = 2.0 * n ** 3
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev)
    b = torch.randn(n, n, generator=g).to(dev)
    paths = {}
    with torch.inference_mode():
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            x, w = a.to(dtype), b.to(dtype)
            paths[f"mm_{tag}"] = _gflops(lambda: torch.mm(x, w), flops, min_time, repeats, sync)
            if dev.type == "cpu" and torch.backends.mkldnn.is_available():
                try:
                    xm, wm = x.to_mkldnn(), w.to_mkldnn()
                    paths[f"onednn_{tag}"] = _gflops(lambda: torch._C._nn.mkldnn_linear(xm, wm, None),
                                                     flops, min_time, repeats, sync)
                except RuntimeError:  # a build or chip without that oneDNN kernel
                    pass
    limits = {tag: max(v for k, v in paths.items() if k.endswith(tag)) for tag in ("fp32", "bf16")}
    return {
        "key": machine_key(device), "device": dev.type,
        "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "matmul_n": n, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "gflops": {k: round(v, 1) for k, v in paths.items()},
        "limit_gflops": {k: round(v, 1) for k, v in limits.items()},
    }


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def machine_limits(device: str = "cpu", measure: bool | None = None, **kwargs) -> dict | None:
    """This machine's limits: measure=True measures now and stores them; None reuses the cache
    or measures when it has none for this machine; False only reads the cache (None if absent)."""
    path = cache_path()
    key = machine_key(device)
    cache = _read_cache(path)
    if measure is False or (measure is None and key in cache):
        return cache.get(key)
    result = measure_machine(device, **kwargs)
    cache = _read_cache(path)
    cache[key] = result
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return result
