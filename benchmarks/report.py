"""The harness's markdown tables, its ratio plot and the targets of issue 12."""
from __future__ import annotations

from pathlib import Path

from benchmarks import common

# (ratio, workloads, limit, description): a wall-clock median over `limit` misses the target.
TARGETS = (
    ("jnn / raw", ("W1", "W3", "W4", "W5", "W6", "W7"), 1.02, "jnn step vs the same step in raw JAX + optax"),
    ("compile jnn / raw", ("W1", "W2", "W3", "W4", "W5", "W6", "W7"), 1.2, "time to first step (trace + compile)"),
    ("jnn / torch_eager_best", ("W1", "W4"), 1 / 1.3, "jnn >= 1.3x faster than PyTorch eager"),
    ("jnn / torch_eager_best", ("W3", "W5"), 1.0, "jnn no slower than PyTorch eager"),
)
PLOTTED = ("jnn / raw", "jnn / flax", "jnn / torch_eager_best", "jnn / torch_compile")


def _r(r: dict | None, digits: int = 3) -> str:
    if not r:
        return ""
    return f"{r['median']:.{digits}f} [{r['min']:.{digits - 1}f}, {r['max']:.{digits - 1}f}]"


def headline(name: str, w: dict, ratio: str) -> float | None:
    """The median of one headline ratio of a workload's result (None where not measured)."""
    if "error" in w:
        return None
    if ratio.startswith("compile "):  # the median of cold compiles where measured, else the first step
        key = ratio[len("compile "):]
        rounds = w.get("compile_rounds_ratio", {}).get(key)
        return rounds["median"] if rounds else w.get("compile_ratio", {}).get(key)
    if w["kind"] == "time_to_accuracy":
        r = w["ratios"].get(ratio)
        return r["per_step"]["median"] if r else None
    r = w.get("ratios", {}).get(ratio)
    return r["wall"]["median"] if r else None


def check_targets(workloads: dict) -> list[dict]:
    rows = []
    for ratio, names, limit, what in TARGETS:
        for name in names:
            if name in workloads:
                value = headline(name, workloads[name], ratio)
                rows.append({"workload": name, "ratio": ratio, "limit": limit, "what": what, "value": value,
                             "met": None if value is None else value <= limit})
    return rows


def _step_section(name: str, w: dict, peaks: dict) -> list[str]:
    unit = w["unit"]
    peak = peaks.get("bfloat16" if w.get("precision") == "mixed_bf16" else "float32", peaks.get("float32"))
    precision = f", precision {w['precision']}" if w.get("precision") else ""
    lines = [f"## {name}: {w['title']}, batch {w['batch_size']}{precision}",
             "", f"| candidate | ms/step median [IQR] | CPU ms/step | steps/s | {unit}/s | first step s | "
                 "GFLOP/s (XLA count) | % of matmul peak | memory |", "|---|---|---|---|---|---|---|---|---|"]
    for k, c in w["candidates"].items():
        s = c["wall_ms"]
        gf = c["flops_per_s"] / 1e9 if c.get("flops_per_s") else None
        if c.get("xla_temp_mb") is not None:
            mem = f"XLA temp {c['xla_temp_mb']:.0f} MB"
        elif c.get("max_rss_mb"):
            device = f", device {c['device_peak_mb']:.0f} MB" if c.get("device_peak_mb") else ""
            mem = f"RSS {c['max_rss_mb']:.0f} MB{device}"
        else:
            mem = ""
        gflops = "" if gf is None else f"{gf:.1f}"
        share = "" if gf is None or not peak else f"{100 * gf * 1e9 / peak:.1f}"
        label = k + (f" ({c['threads']} thr)" if c.get("threads") else "")
        lines.append(f"| {label} | {s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] | {c['cpu_ms']:.3f} | "
                     f"{c['steps_per_s']:.1f} | {c['items_per_s']:,.0f} | {c['first_step_s']:.2f} | "
                     f"{gflops} | {share} | {mem} |")
    mfu = {k: c["mfu"] for k, c in w["candidates"].items() if c.get("mfu")}
    if mfu:
        lines += ["", "MFU (analytic model FLOPs per second over the dense bf16 peak): " +
                  ", ".join(f"{k} {100 * v:.1f}%" for k, v in mfu.items()) + "."]
    lines += ["", f"JAX process max RSS {w['max_rss_mb']:.0f} MB" +
              (f", device peak {w['device_peak_mb']:.0f} MB" if w.get("device_peak_mb") else "") +
              f"; first-step losses {', '.join(f'{k} {v:.6f}' for k, v in w['first_step_losses'].items())}.", "",
              "| ratio | wall: median [min, max] | CPU: median [min, max] |", "|---|---|---|"]
    for k, r in w["ratios"].items():
        lines.append(f"| {k} | {_r(r['wall'])} | {_r(r['cpu'])} |")
    for k, v in w.get("compile_ratio", {}).items():
        lines.append(f"| first step (trace + compile + run, one each) {k} | {v:.3f} | |")
    for k, r in w.get("compile_rounds_ratio", {}).items():
        lines.append(f"| cold compile (trace + lower + compile, {r['n']} each) {k} | {_r(r)} | |")
    return lines + [""]


def _tta_section(name: str, w: dict) -> list[str]:
    lines = [f"## {name}: {w['title']} (batch {w['batch_size']}, evaluated every {w['eval_every']} steps)", "",
             "| candidate | wall s to target: median [min, max] | steps: median [min, max] | reached | ms/step "
             "in the loop | compile s |", "|---|---|---|---|---|---|"]
    for k, c in w["candidates"].items():
        compile_s = "" if c["compile_s"] is None else f"{c['compile_s']:.2f}"
        lines.append(f"| {k} | {_r(c['wall_s'], 2)} | {c['steps']['median']:.0f} [{c['steps']['min']:.0f}, "
                     f"{c['steps']['max']:.0f}] | {c['reached']}/{c['seeds']} | {c['ms_per_step']['median']:.2f} | "
                     f"{compile_s} |")
    lines += ["", "| ratio (per seed) | wall to target: median [min, max] | ms per step: median [min, max] |",
              "|---|---|---|"]
    for k, r in w["ratios"].items():
        lines.append(f"| {k} | {_r(r['wall_to_target'])} | {_r(r['per_step'])} |")
    for k, v in w["compile_ratio"].items():
        lines.append(f"| compile {k} | {v:.3f} | |")
    return lines + [""]


def _parallel_section(name: str, w: dict) -> list[str]:
    lines = [f"## {name}: {w['title']}", "", "| devices | ratio | wall: median [min, max] | CPU: median | limit |",
             "|---|---|---|---|---|"]
    for n, run in w["devices"].items():
        if "error" in run:
            lines.append(f"| {n} | error: {run['error']} | | | |")
            continue
        for k, r in run["ratios"].items():
            lines.append(f"| {n} | {k} | {_r(r['wall'])} | {r['cpu']['median']:.3f} | {r.get('limit') or ''} |")
    lines += [""] + [f"{n} devices: max RSS {run.get('max_rss_mb', 0):.0f} MB, {run.get('seconds', 0):.0f} s."
                     for n, run in w["devices"].items()]
    return lines + [""]


def _default_run_section(name: str, w: dict) -> list[str]:
    s = w["wall_s"]
    return [f"## {name}: {w['title']}", "", f"`{w['command']}`: {s['median']:.2f} s wall [{s['min']:.2f}, "
            f"{s['max']:.2f}] over {s['n']} fresh processes; exit codes {w['exit_codes']}.", ""]


def markdown(result: dict) -> str:
    env, workloads = result["environment"], result["workloads"]
    peaks = result.get("peak_flops_per_s") or {}
    lines = [f"# jnn benchmark, suite {result['suite']} ({env['date'][:10]})", "", common.env_line(env), "",
             f"Backend {result.get('backend')} ({result.get('device_kind')}); the run took {result['seconds']:.0f} s "
             f"(`{result['command']}`)."]
    if result.get("peak"):
        per_dtype = [f"{d} n={m['n']}: " + ", ".join(f"{p[d]['flops_per_s'] / 1e9:,.0f}" for p in result["peak"]
                                                      if d in p) + " GFLOP/s" for d, m in result["peak"][0].items()]
        lines.append("Matmul peak (the best of a few (n, n) @ (n, n) matmuls, measured by each workload's process "
                     "before its run; the fractions use the best): " + "; ".join(per_dtype) + ".")
    if result["suite"].startswith("gpu"):
        dense = result.get("dense_peak_tflops")
        lines.append(f"Dense bf16 peak of the device (table in `benchmarks/gpu.py`): {dense} TFLOP/s." if dense else
                     f"Device kind {result.get('device_kind')!r} is not in the dense bf16 peak table of "
                     f"`benchmarks/gpu.py`: no MFU.")
    lines += ["", "Ratios are medians of per-round ratios of wall time per step [min, max]: below 1, jnn is "
              "faster. `torch_eager_best` is, per round, the faster of PyTorch eager at 1 thread and at one "
              "thread per core.", "", "## Summary", "",
              "| workload | jnn / raw | jnn / flax | jnn / PyTorch eager (best) | jnn / torch.compile "
              "| compile jnn / raw |", "|---|---|---|---|---|---|"]
    for name, w in workloads.items():
        if "error" in w:
            lines.append(f"| {name} | error: {w['error']} | | | | |")
            continue
        if w["kind"] == "parallel":
            best = {n: run["ratios"].get("jnn_jit_bare / hand_jit", {}).get("wall") for n, run in w["devices"].items()
                    if "ratios" in run}
            per_count = ", ".join(f"{n} dev: {_r(r)}" for n, r in best.items())
            lines.append(f"| {name} (sharded jit, loss only) | {per_count} | | | | |")
            continue
        if w["kind"] == "default_run":
            lines.append(f"| {name} ({w['title']}) | {w['wall_s']['median']:.2f} s wall | | | | |")
            continue
        cells = []
        for ratio in ("jnn / raw", "jnn / flax", "jnn / torch_eager_best", "jnn / torch_compile"):
            r = w["ratios"].get(ratio)
            cells.append(_r(r["per_step"] if w["kind"] == "time_to_accuracy" else r["wall"]) if r else "")
        if w["kind"] == "time_to_accuracy":
            cells[2] = f"jnn / sklearn (wall to target) {_r(w['ratios']['jnn / sklearn']['wall_to_target'])}" \
                if "jnn / sklearn" in w["ratios"] else ""
        comp = headline(name, w, "compile jnn / raw")
        comp = "" if comp is None else f"{comp:.2f}"
        lines.append(f"| {name} ({w['title']}) | " + " | ".join(cells) + f" | {comp} |")
    targets = result.get("targets", [])
    if targets:
        lines += ["", "| target | workload | limit | measured | met |", "|---|---|---|---|---|"]
        for t in targets:
            value = "" if t["value"] is None else f"{t['value']:.3f}"
            met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**missed**")
            lines.append(f"| {t['what']} (`{t['ratio']}`) | {t['workload']} | {t['limit']:.3f} | {value} | {met} |")
    if result.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {s}" for s in result["skipped"]]
    lines.append("")
    for name, w in workloads.items():
        if "error" in w:
            continue
        if w["kind"] == "step":
            lines += _step_section(name, w, peaks)
        else:
            lines += {"time_to_accuracy": _tta_section, "parallel": _parallel_section,
                      "default_run": _default_run_section}[w["kind"]](name, w)
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """Writes the ratio plot (PNG); returns None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed: plot skipped (pip install matplotlib)"
    bars = []  # (label, ratio name, median, min, max)
    for name, w in result["workloads"].items():
        if "error" in w:
            continue
        if w["kind"] == "parallel":
            for n, run in w["devices"].items():
                r = run.get("ratios", {}).get("jnn_jit_bare / hand_jit")
                if r:
                    bars.append((f"{name}\n{n} dev", "jnn / raw", r["wall"]))
            continue
        for ratio in PLOTTED:
            r = w.get("ratios", {}).get(ratio)
            if r:
                tta = w["kind"] == "time_to_accuracy"
                bars.append((f"{name}\nper step" if tta else name, ratio, r["per_step"] if tta else r["wall"]))
    if not bars:
        return "no ratios to plot"
    labels = list(dict.fromkeys(b[0] for b in bars))
    colors = dict(zip(PLOTTED, ("tab:blue", "tab:green", "tab:orange", "tab:red")))
    width = 0.8 / len(PLOTTED)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    for j, ratio in enumerate(PLOTTED):
        pts = [(labels.index(lab), r) for lab, name, r in bars if name == ratio]
        if not pts:
            continue
        xs = [i + (j - (len(PLOTTED) - 1) / 2) * width for i, _ in pts]
        med = [r["median"] for _, r in pts]
        err = [[r["median"] - r["min"] for _, r in pts], [r["max"] - r["median"] for _, r in pts]]
        ax.bar(xs, med, width, yerr=err, capsize=2, color=colors[ratio], label=ratio)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("wall time per step, ratio (below 1: jnn faster)")
    ax.set_title(f"jnn benchmark, {result['suite']} ({result['environment']['date'][:10]}); "
                 "median, [min, max] over rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
