"""The outputs of a benchmark: an aligned text table, a CSV in timm's column style, a sweep plot and a
side-by-side plot of ours against the peer."""
from __future__ import annotations

import csv
import os

__all__ = ["format_table", "write_csv", "plot_sweep", "plot_peer"]


def _num(v, fmt: str) -> str:
    return "-" if v is None or v == "" else format(v, fmt)


def format_table(rows: list[dict], modes=("infer",)) -> str:
    """One line per model, impl and mode; numbers right-aligned."""
    peak = any(f"{m}_frac_of_peak" in r for r in rows for m in modes)
    head = ["model", "impl", "mode", "img", "batch", "img/s", "ms/batch", "spread%", "mem MB", "params M",
            "GMACs", "GFLOP/s"] + (["%peak"] if peak else []) + ["ratio"]
    lines = []
    groups: dict = {}
    for r in rows:  # a model's impls side by side, per mode (a sweep: per image size too)
        groups.setdefault((r["model"], r.get("tokens")), []).append(r)
    ordered = [(r, m) for group in groups.values() for m in modes for r in group]
    for r, m in ordered:
        if f"{m}_samples_per_sec" not in r:
            continue
        cells = [r["model"], r["impl"] + ("+opt" if r.get("optimized") else ""), m, str(r[f"{m}_img_size"]),
                 str(r[f"{m}_batch_size"]), _num(r[f"{m}_samples_per_sec"], ".2f"),
                 _num(r[f"{m}_step_time"], ".1f"), _num(r[f"{m}_spread_pct"], ".1f"),
                 _num(r[f"{m}_peak_mem_mb"], ".1f"), _num(r["param_count"], ".2f"),
                 _num(r[f"{m}_gmacs"], ".3f"), _num(r[f"{m}_gflops_per_s"], ".1f")]
        if peak:
            frac = r.get(f"{m}_frac_of_peak")
            cells.append("-" if frac is None else f"{100 * frac:.1f}")
        cells.append(_num(r.get(f"{m}_ratio"), ".3f"))
        lines.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    left = {0, 1, 2}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    first = rows[0] if rows else {}
    caption = (f"{first.get('precision', '')}, {'compiled' if first.get('compiled') else 'eager'}, "
               f"{first.get('device', '')}, {first.get('threads', '')} thread(s)")
    return "\n".join([caption, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines])


def write_csv(rows: list[dict], path: str, columns: list[str]) -> str:
    """Write rows with the given columns (missing values left empty); creates the folder."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return path


def _pyplot(option: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from .harness import BenchError
        raise BenchError(f"{option} plots with matplotlib (pip install matplotlib): {e}") from None
    return plt


def _save(fig, plt, path: str) -> str:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_peer(rows: list[dict], path: str, modes=("infer",)) -> str:
    """Bars of img/s, ours beside the peer's, per model; one panel per mode, the ratio above each pair."""
    plt = _pyplot("--peer")
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    first = rows[0] if rows else {}
    for ax, mode in zip(axes[0], modes):
        key = f"{mode}_samples_per_sec"
        models = list(dict.fromkeys(r["model"] for r in rows if key in r))
        for i, model in enumerate(models):
            for r in rows:
                if r["model"] != model or key not in r:
                    continue
                ours = r["impl"] != first.get("peer")
                ax.bar(i + (-0.2 if ours else 0.2), r[key], 0.4, color="tab:blue" if ours else "tab:gray",
                       label=(r["impl"] if i == 0 else None))
                if ours and r.get(f"{mode}_ratio"):
                    ax.text(i - 0.2, r[key], f"x{r[f'{mode}_ratio']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([m.replace("_patch4_window7_224", "") for m in models], rotation=20, fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title(f"{mode}, batch {first.get(f'{mode}_batch_size', '?')}, {first.get('precision', '')}, "
                     f"{'compiled' if first.get('compiled') else 'eager'}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_sweep(rows: list[dict], path: str, mode: str = "infer") -> str:
    """img/s and peak memory against stage-1 tokens, one line per model and impl (log-log)."""
    plt = _pyplot("--sweep")
    lines: dict[str, list] = {}
    for r in rows:
        if f"{mode}_samples_per_sec" in r:
            lines.setdefault(f"{r['model']} ({r['impl']})", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in rs]
        style = "--" if "(timm)" in label else "-"
        axes[0].plot(tokens, [r[f"{mode}_samples_per_sec"] for r in rs], style, marker="o", label=label)
        mem = [(t, r[f"{mode}_peak_mem_mb"]) for t, r in zip(tokens, rs) if r.get(f"{mode}_peak_mem_mb")]
        if mem:
            axes[1].plot(*zip(*mem), style, marker="o", label=label)
    first = rows[0] if rows else {}
    what = f"{mode}, batch {first.get(f'{mode}_batch_size', '?')}, {first.get('precision', '')}"
    for ax, ylabel in zip(axes, ("images / s", "peak memory of a step (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens at stage 1 = (img / stage-1 reduction)^2")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"throughput ({what})")
    axes[1].set_title("memory")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)
