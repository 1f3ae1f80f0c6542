"""Speed and memory of every mechanism at several lengths, as LRA's Table 2 (there: byte-level Text,
batch 32, 4x4 TPU v3; here: the Text config on this machine's CPU, a small batch, a time cap per cell).

Each cell (mechanism, length) runs in its own subprocess: build the Text-config model, run one
untimed training step (forward + backward + AdamW step), then timed steps until `time_cap` seconds.
Peak memory = the process's resident-set high-water mark (VmHWM in /proc/self/status) during the
timed steps minus the resident set just before them; the high-water mark is reset first by writing
5 to /proc/self/clear_refs. So it counts what a training step allocates (activations, gradients,
optimizer state on its first step is already in the baseline), not the Python/torch runtime. A cell
that exceeds `cell_timeout`, or allocates past `mem_cap_gb` (RLIMIT_DATA set in the child, so the
allocation fails inside the cell instead of starving the machine), is reported as TIMEOUT / OOM.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

__all__ = ["run_speed", "measure_cell"]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cap_memory(gb: float):
    import resource
    if gb and gb > 0:
        limit = int(gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def measure_cell(attention: str, length: int, batch_size: int, scale: float, time_cap: float, threads: int,
                 attn_options: dict | None = None) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    from .model import build_model
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("text", attention, 257, length, 2, scale=scale, attn_options=attn_options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    x = torch.randint(1, 257, (batch_size, length))
    y = torch.randint(0, 2, (batch_size,))
    mask = torch.ones(batch_size, length, dtype=torch.bool)

    def step():
        loss = F.cross_entropy(model(x, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()                                      # warm-up: kernels chosen, optimizer state allocated
    gc.collect()
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS")
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if time.perf_counter() - t0 >= time_cap or n >= 50:
            break
    dt = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    mem = (peak_kb - base_kb) / 1024 if reset and peak_kb is not None and base_kb is not None else None
    return dict(status="ok", steps=n, seconds=dt, steps_per_s=n / dt, peak_mb=mem,
                params=sum(p.numel() for p in model.parameters()))


def _cell(name: str, length: int, batch_size: int, scale: float, time_cap: float, cell_timeout: float,
          threads: int, attn_options: dict, mem_cap_gb: float) -> dict:
    spec = json.dumps(dict(attention=name, length=length, batch_size=batch_size, scale=scale,
                           time_cap=time_cap, threads=threads, attn_options=attn_options, mem_cap_gb=mem_cap_gb))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "formers.lra.speed", spec], capture_output=True, text=True,
                           timeout=cell_timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", wall=time.time() - t0)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        err = (r.stderr.strip().splitlines() or ["no output"])[-1]
        oom = r.returncode in (-9, 137) or any(w in r.stderr.lower() for w in ("memory", "bad_alloc", "allocat"))
        return dict(status="oom" if oom else "error", error=err[:200], wall=time.time() - t0)
    return dict(json.loads(lines[-1]), wall=time.time() - t0)


def _fmt(row: dict, ref: dict | None, key: str) -> str:
    if row["status"] != "ok":
        return row["status"].upper()
    v = row[key]
    if v is None:
        return "n/a"
    s = f"{v:.2f}" if key == "steps_per_s" else f"{v:.0f}"
    if ref is not None and ref.get("status") == "ok" and ref.get(key):
        s += f" ({v / ref[key]:.2f}x)"
    return s


def run_speed(names, lengths, out: str, batch_size: int = 1, scale: float = 1.0, time_cap: float = 20.0,
              cell_timeout: float = 120.0, threads: int = 1, attn_options: dict | None = None,
              mem_cap_gb: float = 6.0) -> int:
    from formers.attention import attention_class, list_attentions
    names = names or list_attentions()
    for n in names:
        attention_class(n)                      # unknown name -> ValueError now
    if any(length < 16 for length in lengths):
        raise ValueError("--lengths must be >= 16")
    if "softmax" not in names:
        names = ["softmax"] + list(names)
    os.makedirs(out, exist_ok=True)
    rows = []
    for length in lengths:
        for name in names:
            r = _cell(name, length, batch_size, scale, time_cap, cell_timeout, threads, attn_options or {}, mem_cap_gb)
            r.update(attention=name, length=length)
            rows.append(r)
            print(f"{name:>14} {length:>6}: {r['status']:<8}"
                  + (f"{r['steps_per_s']:.3f} steps/s  peak {r['peak_mb'] if r['peak_mb'] is None else round(r['peak_mb'])} MB"
                     if r["status"] == "ok" else r.get("error", "")), flush=True)
    _write(rows, names, lengths, out, dict(batch_size=batch_size, scale=scale, time_cap=time_cap, threads=threads,
                                           mem_cap_gb=mem_cap_gb))
    return 0


def _write(rows, names, lengths, out, setup):
    keys = ["attention", "length", "status", "steps", "seconds", "steps_per_s", "peak_mb", "params", "wall", "error"]
    with open(os.path.join(out, "speed.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    cell = {(r["attention"], r["length"]): r for r in rows}
    md = [f"Training steps/s (forward + backward + AdamW) and peak RSS growth (MB) on the LRA Text config; "
          f"batch {setup['batch_size']}, width scale {setup['scale']}, {setup['threads']} thread(s), "
          f"time cap {setup['time_cap']} s per cell, memory cap {setup['mem_cap_gb']} GB; OOM / TIMEOUT = the cell "
          f"ran past a cap; (x) = relative to softmax at the same length. Memory = peak RSS growth during the "
          f"timed steps (/proc VmHWM after clear_refs, one subprocess per cell).", "",
          "| attention | " + " | ".join(f"{n} steps/s" for n in lengths) + " | " + " | ".join(f"{n} MB" for n in lengths) + " |",
          "|---" * (1 + 2 * len(lengths)) + "|"]
    for name in names:
        sp = [_fmt(cell[(name, n)], cell.get(("softmax", n)), "steps_per_s") for n in lengths]
        mem = [_fmt(cell[(name, n)], cell.get(("softmax", n)), "peak_mb") for n in lengths]
        md.append(f"| {name} | " + " | ".join(sp) + " | " + " | ".join(mem) + " |")
    with open(os.path.join(out, "speed.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        _plot(rows, names, os.path.join(out, "speed.png"))
    except ImportError:
        print("matplotlib is not installed: no speed.png", file=sys.stderr)


def _plot(rows, names, path):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        ok = [r for r in rows if r["attention"] == name and r["status"] == "ok"]
        if not ok:
            continue
        a1.plot([r["length"] for r in ok], [r["steps_per_s"] for r in ok], "o-", label=name)
        mem = [r for r in ok if r["peak_mb"] is not None]
        a2.plot([r["length"] for r in mem], [max(r["peak_mb"], 0.1) for r in mem], "o-", label=name)
    for ax, lab in ((a1, "training steps / s"), (a2, "peak RSS growth (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("LRA Text config: speed and memory per mechanism (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    _cap_memory(spec.get("mem_cap_gb", 0))
    print(json.dumps(measure_cell(spec["attention"], spec["length"], spec["batch_size"], spec["scale"],
                                  spec["time_cap"], spec["threads"], spec.get("attn_options"))))
