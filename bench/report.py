"""Reporting a run: the printed table, JSON, Markdown, and PNG plots versus dictionary size n."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from sae.atomic import atomic_write

from .ops import OPS
from .providers_topk import BASELINES, PROVIDERS

PALETTE = ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
COLORS = dict(zip(PROVIDERS, PALETTE, strict=True))
LABELS = {"ours": "ours", "dense": "dense PyTorch", "torch_sparse": "PyTorch-sparse", "chunked": "chunked",
          "sparsify": "eai-sparsify", "cpp": "ours (C++)"}  # fmt: skip


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def stem(doc: dict) -> str:
    """File name stem: the device and the suite, e.g. 'nvidia-h100-80gb-hbm3-quick' or 'cpu-quick'."""
    dev = doc["device"]
    name = dev["name"] if dev["kind"] == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", f"{name}-{doc['suite']}".lower()).strip("-")


def rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The results table: a header and one row of strings per (shape, op, provider)."""
    baselines = [b for b in BASELINES if any(r["provider"] == b for r in doc["results"])]
    head = ["op", "B", "d", "n", "k", "dtype", "provider", "ms [q20, q80]", "Mtok/s", "TFLOP/s", "GB/s",
            "x GEMM", "% copy BW", *[f"vs {LABELS[b]}" for b in baselines], "peak MiB"]  # fmt: skip
    out = []
    for r in doc["results"]:
        shape = [r["op"], str(r["B"]), str(r["d"]), str(r["n"]), str(r["k"]), r["dtype"], r["provider"]]
        if r["status"] != "ok":
            out.append(shape + [f"skipped: {r['reason']}"] + [""] * (len(head) - len(shape) - 1))
            continue
        sp = r.get("speedup", {})
        peak = r["peak_mem_bytes"]
        out.append(
            shape
            + [
                f"{r['ms']:.3f} [{r['ms_q20']:.3f}, {r['ms_q80']:.3f}]",
                f"{r['tokens_per_s'] / 1e6:.3f}",
                f"{r['tflops']:.2f}",
                f"{r['gbps']:.1f}",
                _f(r["x_gemm"], ".2f"),
                f"{100 * r['copy_bw_frac']:.1f}",
                *[_f(sp.get(b), ".2f") for b in baselines],
                _f(None if peak is None else peak / 2**20, ".0f"),
            ]
        )
    return head, out


def largest_lines(doc: dict) -> list[str]:
    """The largest-n case (bench.largest) in words; [] when it did not run."""
    big = doc.get("largest_n")
    if not big:
        return []
    shape = f"d={big['d']}, B={big['B']}, k={big['k']}, {big['dtype']}"
    out = []
    for name, r in big["providers"].items():
        n = "none" if r["largest_n"] is None else f"{r['largest_n']} (2^{r['largest_n'].bit_length() - 1})"
        peak = "" if r["peak_mem_bytes"] is None else f", peak {r['peak_mem_bytes'] / 2**30:.1f} GiB"
        out.append(f"largest n that trains ({shape}), {LABELS[name]}: {n}{peak}; out of memory at {r['first_oom_n']}")
    return out


def target_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The targets table (bench.targets, evaluated at the end of a run): a header and a row per ratio."""
    head = ["class", "op", "ratio", "target", "median [q20, q80]", "met", "provider", "n"]
    out = []
    for t in doc.get("targets", []):
        unit = " GEMM" if t["baseline"] == "gemm" else "x"
        if t["median"] is None:
            value, met = f"not measured: {t['missing']}", "-"
        else:
            value = f"{t['median']:.2f}{unit} [{_f(t['q20'], '.2f')}, {_f(t['q80'], '.2f')}]"
            met = "yes" if t["met"] else "NO"
        out.append([t["class"], t["op"], t["ratio"], t["target"], value, met, t["provider"], str(t["n"])])
    return head, out


def _targets_summary(doc: dict) -> str:
    rows = doc.get("targets", [])
    shapes = sorted({f"B={t['B']} d={t['d']} n={t['n']} k={t['k']} {t['dtype']}" for t in rows})
    return f"{sum(bool(t['met']) for t in rows)} of {len(rows)} targets of DESIGN section 7 met at {', '.join(shapes)}"


def _text(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return [line(head), line(["-" * w for w in widths]), *map(line, body)]


def text_table(doc: dict) -> str:
    lines = [*_text(*rows(doc)), *largest_lines(doc)]
    if doc.get("targets"):
        lines += ["", f"{_targets_summary(doc)} (ratios within this run: median [q20, q80] of per-round ratios)"]
        lines += _text(*target_rows(doc))
    return "\n".join(lines)


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict) -> str:
    dev, ver, git, cfg = doc["device"], doc["versions"], doc["git"], doc["config"]
    facts = ", ".join(f"{k}={v}" for k, v in dev.items() if v is not None)
    load = doc.get("load_avg") or {}
    lines = [
        f"# sae-kernels benchmark: {doc['suite']} suite on {dev['name']}",
        "",
        f"- created: {doc['created']}; commit {git['commit']}{' (dirty)' if git['dirty'] else ''}",
        f"- device: {facts}",
        f"- load average (1, 5, 15 min): before {load.get('before')}, after {load.get('after')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        "- " + "; ".join(f"{k}: {v}" for k, v in cfg.items()),
        "- columns: `x GEMM` = time / the encoder-shape GEMM's time; `% copy BW` = the op's necessary bytes "
        "per second / the measured copy bandwidth; `vs X` = X's time / this provider's time (same run; on the CPU "
        "both ratios are medians of per-round ratios, the GEMM timed in the same rounds).",
        "",
        "## Ceilings (same run)",
        "",
        f"- device-to-device copy of {doc['ceilings']['copy']['bytes'] / 2**20:.0f} MiB: "
        f"{doc['ceilings']['copy']['gbps']:.1f} GB/s (read + write)",
    ]
    for g in doc["ceilings"]["gemm"]:
        lines.append(f"- GEMM [{g['B']}, {g['d']}] x [{g['d']}, {g['n']}] {g['dtype']}: {g['ms']:.3f} ms, "
                     f"{g['tflops']:.2f} TFLOP/s")  # fmt: skip
    if doc.get("targets"):
        head, body = target_rows(doc)
        lines += ["", "## Targets", "", f"{_targets_summary(doc)}. A speedup "
                  "is the baseline's time over ours, `GEMM` ours over the encoder GEMM of the shape; on the CPU each "
                  "the median [q20, q80] of its per-round ratios (interleaved rounds).", "",
                  _md_row(head), _md_row(["---"] * len(head)), *map(_md_row, body)]  # fmt: skip
    head, body = rows(doc)
    lines += ["", "## Results", "", _md_row(head), _md_row(["---"] * len(head)), *map(_md_row, body)]
    if largest_lines(doc):
        lines += ["", "## Largest dictionary that trains", "", *[f"- {line}" for line in largest_lines(doc)]]
    energy = [r for r in doc["results"] if r.get("energy_j_per_token") is not None]
    if energy:
        lines += ["", "## Energy (NVML)", "", "| op | n | provider | mJ/token |", "| --- | --- | --- | --- |"]
        lines += [
            _md_row([r["op"], str(r["n"]), r["provider"], f"{1e3 * r['energy_j_per_token']:.4f}"]) for r in energy
        ]
    if doc["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def _groups(doc: dict) -> dict[tuple, list[dict]]:
    """Results by (B, d, k, dtype): each group is one sweep over n."""
    groups = defaultdict(list)
    for r in doc["results"]:
        if r["status"] == "ok":
            groups[(r["B"], r["d"], r["k"], r["dtype"])].append(r)
    return groups


def _plot(doc: dict, group: list[dict], metric, ylabel: str, title: str, path: Path, ref: str | None) -> bool:
    """One PNG: a panel per op, a line per provider, metric(record) against n. False when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    panels = defaultdict(lambda: defaultdict(list))
    for r in group:
        y = metric(r)
        if y is not None and r["provider"] != ref:
            panels[r["op"]][r["provider"]].append((r["n"], y))
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.8 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    number = FuncFormatter(lambda v, _: f"{v:.3g}")
    # minor ticks: label 2, 3 and 5 times a power of ten only, so labels never crowd
    sparse = FuncFormatter(lambda v, _: f"{v:.3g}" if f"{v:.0e}"[0] in "235" else "")
    for ax, (op, lines) in zip(axes.flat, panels.items(), strict=False):
        ns = sorted({n for pts in lines.values() for n, _ in pts})
        for prov, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[prov], label=LABELS[prov])
            for n, y in pts if len(ns) == 1 else ():  # one n: the log axis may show no tick near the value
                ax.annotate(f"{y:.3g}", (n, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=COLORS[prov])  # fmt: skip
        if ref is not None:
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label=f"{LABELS[ref]} (= 1)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns], rotation=30 if len(ns) > 4 else 0)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(number)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_title(f"{op}: {OPS[op].doc.split(':')[0]}" if op in OPS else op, fontsize=10)
        ax.set_xlabel("dictionary size n (latents)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# op groups (ops.Op.group): file name infix and title
PLOT_GROUPS = {"topk": ("", "TopK ops"), "threshold": ("-threshold", "threshold families (encode, training step)"),
               "forward": ("-forward", "inference forward model(x) per SAE class")}  # fmt: skip


def plots(doc: dict, out_dir: Path) -> list[Path]:
    """Speedup over dense, over PyTorch-sparse, and peak memory, each versus n; one PNG per (B, d, k, dtype)
    and op group (TopK ops, threshold families, forwards), a panel per op."""
    try:
        import matplotlib  # noqa: F401  (an optional `bench` extra: no plots without it)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    groups = _groups(doc)
    for (B, d, k, dtype), records in groups.items():
        shape = f"B={B}, d={d}, k={k}, {dtype}"
        suffix = "" if len(groups) == 1 else f"-d{d}-k{k}-B{B}-{dtype}"
        device = doc["device"]["name"]
        for kind, (infix, what_ops) in PLOT_GROUPS.items():
            group = [r for r in records if OPS[r["op"]].group == kind]
            name = lambda metric, infix=infix, suffix=suffix: out_dir / f"{stem(doc)}{infix}-{metric}{suffix}.png"
            for ref in ("dense", "torch_sparse"):
                path = name(f"speedup-vs-{ref.replace('_', '-')}")
                title = f"{device}, {what_ops}:\nspeedup over {LABELS[ref]} ({shape}; higher is better)"
                ylabel = f"speedup over {LABELS[ref]} (x, time ratio)"
                if _plot(doc, group, lambda r, b=ref: r["speedup"].get(b), ylabel, title, path, ref):
                    written.append(path)
            mem = lambda r: None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
            what = "max_memory_allocated" if doc["device"]["kind"] == "cuda" else "peak RSS growth"
            title = f"{device}, {what_ops}:\npeak memory ({shape}; lower is better)"
            if _plot(doc, group, mem, f"peak memory (GiB, {what})", title, name("peak-memory"), None):
                written.append(name("peak-memory"))
    return written


def save_json(doc: dict, path: Path) -> Path:
    """doc as JSON at path, atomically: a reader (or a run killed mid-write) sees the old file or the new one."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1) + "\n"))


def write_json(doc: dict, out_dir: Path) -> Path:
    """The run's JSON, <stem>.json in out_dir; written after every case, so a run stopped early leaves its results."""
    return save_json(doc, out_dir / f"{stem(doc)}.json")


def write(doc: dict, out_dir: Path) -> list[Path]:
    """JSON, Markdown and PNGs into out_dir; returns the paths written."""
    json_path = write_json(doc, out_dir)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(doc))
    return [json_path, md_path, *plots(doc, out_dir)]
