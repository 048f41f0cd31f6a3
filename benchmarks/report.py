"""The harness's markdown tables, its ratio plot, the targets of issue 12 and the headline table.

  python -m benchmarks.report --headline        # the headline table of the committed results
  python -m benchmarks.report --write-readme    # ... written into benchmarks/README.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

from benchmarks import common


class Target(NamedTuple):
    """A figure of some workloads that misses its target above `limit` (below it when `at_least`)."""
    ratio: str  # a key of the workload's ratios, "compile <ratio>", or "mfu" (jnn's model FLOP utilisation)
    workloads: tuple[str, ...]
    limit: float
    what: str
    at_least: bool = False

    def met(self, value: float | None) -> bool | None:
        """Whether `value` meets the target; None where it was not measured."""
        if value is None:
            return None
        return value >= self.limit if self.at_least else value <= self.limit

    def __str__(self) -> str:
        limit = f"{100 * self.limit:.0f}%" if self.ratio.startswith("mfu") else f"{self.limit:.3f}"
        return (">= " if self.at_least else "<= ") + limit


# The CPU suite's targets, on wall-clock medians (`check_targets` judges every run).
TARGETS = (
    Target("jnn / raw", ("W1", "W3", "W4", "W5", "W6", "W7"), 1.02, "jnn step vs the same step in raw JAX + optax"),
    Target("compile jnn / raw", ("W1", "W2", "W3", "W4", "W5", "W6", "W7"), 1.2,
           "time to first step (trace + compile)"),
    Target("jnn / torch_eager_best", ("W1", "W4"), 1 / 1.3, "jnn >= 1.3x faster than PyTorch eager"),
    Target("jnn / torch_eager_best", ("W3", "W5"), 1.0, "jnn no slower than PyTorch eager"),
)
# The GPU suite's, as its runs were judged from 2026-12-04 on (`results/archive/README.md`); G2 and G3 have none.
GPU_TARGETS = (
    Target("jnn / torch_compile", ("G1",), 1 / 1.15, "jnn >= 1.15x torch.compile's tokens/s"),
    Target("mfu", ("G1",), 0.45, "jnn's MFU >= 45% of the dense bf16 peak", at_least=True),
    Target("mfu jnn_fused_cross_entropy", ("G1",), 0.45,
           "the same with `loss=\"fused_cross_entropy\"`: MFU >= 45%", at_least=True),
)
# Rows of the headline table without a target: (ratio, workloads, what).
UNTARGETED = (
    ("jnn / sklearn", ("W2",), "wall time to 98% test accuracy vs scikit-learn's MLPClassifier"),
    ("jnn / torch_compile", ("G2",), "step time vs torch.compile (bf16 autocast)"),
)
PLOTTED = ("jnn / raw", "jnn / flax", "jnn / torch_eager_best", "jnn / torch_compile")
README = Path(__file__).resolve().parent / "README.md"
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def _r(r: dict | None, digits: int = 3) -> str:
    if not r:
        return ""
    return f"{r['median']:.{digits}f} [{r['min']:.{digits - 1}f}, {r['max']:.{digits - 1}f}]"


def measured(w: dict, ratio: str) -> dict | None:
    """One figure of a workload's result, as named in `Target.ratio`: a dict with its "median" (and
    "min" and "max" where it was measured over rounds or seeds), or None where it was not measured."""
    if "error" in w:
        return None
    if ratio.split()[0] == "mfu":  # "mfu" (jnn's candidate) or "mfu <candidate>"
        mfu = w.get("candidates", {}).get((ratio.split() + ["jnn"])[1], {}).get("mfu")
        return None if mfu is None else {"median": mfu}
    if ratio.startswith("compile "):  # the median of cold compiles where measured, else the first step
        key = ratio[len("compile "):]
        rounds = w.get("compile_rounds_ratio", {}).get(key)
        first = w.get("compile_ratio", {}).get(key)
        return rounds or (None if first is None else {"median": first})
    r = w.get("ratios", {}).get(ratio)
    if not r:
        return None
    if w["kind"] == "time_to_accuracy":  # scikit-learn's steps are not jnn's: compare the time to the target
        return r["wall_to_target" if ratio == "jnn / sklearn" else "per_step"]
    return r["wall"]


def check_targets(workloads: dict, targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    rows = []
    for t in targets:
        for name in t.workloads:
            if name in workloads:
                m = measured(workloads[name], t.ratio)
                value = None if m is None else m["median"]
                rows.append({"workload": name, "ratio": t.ratio, "limit": t.limit, "what": t.what, "value": value,
                             "met": t.met(value)})
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
        comp = measured(w, "compile jnn / raw")
        comp = "" if comp is None else f"{comp['median']:.2f}"
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


# ------------------------------------------------------------------------------ the headline table


def newest_results(folder: Path, suite: str) -> dict[str, tuple[Path, dict]]:
    """Workload -> (path, result) of the newest run of `suite` in `folder` that measured it.

    Full runs come first, then `--quick` ones (3 rounds are not a verdict); `--tiny` runs never
    count. A run of a few workloads (`--workloads W3 W5`) replaces only those.
    """
    best = {}
    for path in sorted(folder.glob(f"bench-{suite}*.json")):
        result = json.loads(path.read_text())
        if result["suite"] not in (suite, f"{suite}-quick"):
            continue
        rank = (result["suite"] == suite, result["environment"]["date"])
        for name, w in result["workloads"].items():
            if "error" not in w and (name not in best or rank > best[name][0]):
                best[name] = (rank, path, result)
    return {name: (path, result) for name, (_, path, result) in best.items()}


class Row(NamedTuple):
    """One row of the headline table: a figure of one workload and its target, if it has one."""
    compared: str
    figure: dict | None  # {"median", and "min", "max", "n" where measured over rounds}, as `measured` returns
    target: Target | None = None
    unit: str = "ratio"  # or "%" (MFU) or "s" (wall seconds)

    def cells(self) -> list[str]:
        r, t = self.figure, self.target
        if r is None:
            figure = "not measured"
        elif self.unit == "%":
            figure = f"{100 * r['median']:.1f}%"
        else:
            spread = f" [{r['min']:.2f}, {r['max']:.2f}]" if r.get("n", 1) > 1 else ""
            figure = f"{r['median']:.2f} s{spread}" if self.unit == "s" else f"{r['median']:.3f}{spread}"
        met = "" if t is None else {None: "not measured", True: "yes", False: "**missed**"}[
            t.met(None if r is None else r["median"])]
        return [self.compared, figure, "" if t is None else str(t), met]


def headline_rows(name: str, w: dict) -> list[Row]:
    """The headline table's rows of one workload's result, in the table's order."""
    if w["kind"] == "parallel":  # the like-for-like pairs that carry a limit, at the most devices measured
        n = max((k for k, run in w["devices"].items() if "ratios" in run), key=int, default=None)
        ratios = w["devices"][n]["ratios"] if n else {}
        return [Row(f"`{k}` on {n} fake devices: jnn's data-parallel step vs the same one by hand", r["wall"],
                    Target(k, (name,), r["limit"], "")) for k, r in ratios.items() if r.get("limit")]
    if w["kind"] == "default_run":
        return [Row(f"`{w['command']}` in a fresh process: wall time", w["wall_s"], unit="s")]
    rows = [Row(f"`{t.ratio}`: {t.what}", measured(w, t.ratio), t, "%" if t.ratio.startswith("mfu") else "ratio")
            for t in TARGETS + GPU_TARGETS if name in t.workloads]
    return rows + [Row(f"`{ratio}`: {what}", measured(w, ratio)) for ratio, names, what in UNTARGETED
                   if name in names]


def headline_markdown(folder: Path = common.RESULTS) -> str:
    """The headline table: per workload, the figures of the newest run in `folder` and their targets."""
    lines = ["| workload | compared | measured: median [min, max] | target | met | load average (1 min, start "
             "-> end) | run |", "|---|---|---|---|---|---|---|"]
    runs = {}
    for suite in ("cpu", "gpu"):
        for name, (path, result) in sorted(newest_results(folder, suite).items()):
            runs[path] = result
            machine = result["environment"]["machine"]
            load = " -> ".join(str((machine.get(k) or ["?"])[0]) for k in ("load_average_start", "load_average_end"))
            link = f"[{path.stem}](results/{path.with_suffix('.md').name})"
            for row in headline_rows(name, result["workloads"][name]):
                lines.append("| " + " | ".join([name, *row.cells(), load, link]) + " |")
    lines += ["", "Runs:", ""]
    for path, result in sorted(runs.items()):
        env = result["environment"]
        where = result["device_kind"] if result.get("backend") == "gpu" else \
            f"{env['machine']['cpu_model']} x {env['machine']['cpu_count']} cores"
        lines.append(f"- `{path.name}`: {env['date']}, {where}, `{result['command'].strip()}`")
    return "\n".join(lines)


def readme_with_headline(readme: str, table: str) -> str:
    """`readme` with the text between its headline markers replaced by `table`."""
    start, end = readme.find(HEADLINE_START), readme.find(HEADLINE_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {HEADLINE_START} ... {HEADLINE_END} block to write the table into")
    return readme[:start + len(HEADLINE_START)] + "\n" + table + "\n" + readme[end:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--headline", action="store_true", help="print the headline table of benchmarks/results/")
    p.add_argument("--write-readme", action="store_true",
                   help=f"write it between the {HEADLINE_START} markers of benchmarks/README.md")
    args = p.parse_args(argv)
    if not (args.headline or args.write_readme):
        p.error("nothing to do: pass --headline or --write-readme")
    table = headline_markdown()
    if args.headline:
        print(table)
    if args.write_readme:
        README.write_text(readme_with_headline(README.read_text(), table))
        print(f"wrote the headline table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
