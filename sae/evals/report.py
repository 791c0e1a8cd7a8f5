"""Reports of `python -m sae eval` and `python -m sae l0-sweep`: JSON, a Markdown summary and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write

_BIG = 1 << 16  # tensors with more elements are left out of the JSON


def load_array(path: str | Path) -> torch.Tensor:
    """A tensor from .npy, .pt / .pth (a tensor) or .safetensors (its only tensor)."""
    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    if path.suffix in (".pt", ".pth"):
        t = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: expected one tensor, got {type(t).__name__}")
        return t
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor, got {sorted(tensors)}")
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: unknown array format (expected .npy, .pt or .safetensors)")


def jsonable(obj):
    """obj with tensors as lists (those over 2^16 elements dropped), NaN and inf as None, keys as strings."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, torch.Tensor) and v.numel() > _BIG:
                continue
            out[str(k)] = jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plots(report: dict, folder: Path) -> list[Path]:
    """density.png, l0.png, and coverage.png / cone.png when the report has them."""
    out = []
    rec = report["reconstruction"]
    plt, fig, ax = _figure()
    hist, edges = rec["density_histogram"]["counts"], rec["density_histogram"]["log10_edges"]
    ax.bar(edges[:-1], hist, width=np.diff(edges), align="edge", color="#4477aa")
    ax.set(xlabel="log10 firing frequency (dead latents in the first bin)", ylabel="latents", title="latent density")
    out.append(_save(plt, fig, folder / "density.png"))
    plt, fig, ax = _figure()
    ax.bar(range(len(rec["l0_histogram"])), rec["l0_histogram"], color="#228833")
    ax.set(xlabel="active latents per token", ylabel="tokens", title=f"L0 (mean {rec['l0']:.2f})")
    out.append(_save(plt, fig, folder / "l0.png"))
    if "coverage" in report:
        f1 = torch.as_tensor(report["coverage"]["f1"], dtype=torch.float64)
        plt, fig, ax = _figure()
        ax.bar(range(f1.numel()), f1.nan_to_num(0).tolist(), color="#aa3377")
        ax.set(xlabel="concept", ylabel="best latent F1", ylim=(0, 1))
        ax.set_title(f"coverage {report['coverage']['coverage']:.3f}")
        out.append(_save(plt, fig, folder / "coverage.png"))
    if "cone" in report:
        cone = report["cone"]
        plt, fig, ax = _figure()
        ax.plot(cone["sizes"], cone["mean"], "o-", label="mean cos")
        ax.plot(cone["sizes"], cone["contained_fraction"], "s--", label="fraction contained")
        ax.set(xscale="log", xlabel="atoms s", ylabel="containment", ylim=(0, 1.02), title="concept-cone containment")
        ax.legend()
        out.append(_save(plt, fig, folder / "cone.png"))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(report: dict) -> str:
    """A Markdown summary: one table of the headline numbers."""
    rows = [("SAE", report["sae"]), ("data", report["data"])]
    rec = report["reconstruction"]
    rows += [
        (k, rec[k]) for k in ("tokens", "fvu", "mse", "explained_variance", "l0", "dead_fraction", "dense_fraction")
    ]
    if "coverage" in report:
        rows.append(("coverage (mean best-latent F1)", report["coverage"]["coverage"]))
    if "label_reconstruction" in report:
        lr = report["label_reconstruction"]
        rows += [("label reconstruction F1", lr["mean_f1"]), ("label rows exactly reconstructed", lr["exact_fraction"])]
    if "sparse_probing" in report:
        rows += [(f"{k}-sparse probe accuracy", v) for k, v in report["sparse_probing"]["mean_accuracy"].items()]
    if "cone" in report:
        c = report["cone"]
        rows += [(f"cone containment, s={s}", m) for s, m in zip(c["sizes"], c["mean"])]
    if "monosemanticity" in report:
        rows.append(("monosemanticity (mean over latents)", report["monosemanticity"]["mean"]))
    if "consistency" in report:
        c = report["consistency"]
        rows += [("consistency: MMCS", c["mmcs"]), (f"consistency: matched ({c['matching']})", c["matched"])]
    if "fidelity" in report:
        f = report["fidelity"]
        rows += [(k, f[k]) for k in ("ce_clean", "ce_spliced", "ce_recovered_zero", "ce_recovered_mean", "kl")]
    lines = ["# SAE evaluation", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: str | Path) -> list[Path]:
    """report.json, report.md and the plots into folder; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [_write_text(folder / "report.json", json.dumps(jsonable(report), indent=1))]
    paths.append(_write_text(folder / "report.md", markdown(report)))
    return paths + plots(report, folder)


def write_sweep(result: dict, folder: str | Path) -> list[Path]:
    """sweep.json, sweep.md and sweep.png (both proxies against L0, the pointed L0 marked)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    paths = [_write_text(folder / "sweep.json", json.dumps(jsonable(result), indent=1))]
    lines = [
        "# L0 sweep",
        "",
        f"{result['proxy']} points at L0 = {result['l0']:.2f}"
        + (" (on the grid's edge: widen it)" if result["at_edge"] else ""),
        "",
        f"| {result['param']} | L0 | FVU | c_dec | n-th decoder projection (n={result['nth']}) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['value']} | {r['l0']:.3f} | {r['fvu']:.4f} | {r['c_dec']:.4f} | {r['nth_projection']:.4f} |"
        for r in runs
    ]
    paths.append(_write_text(folder / "sweep.md", "\n".join(lines) + "\n"))
    plt, fig, ax = _figure()
    l0 = [r["l0"] for r in runs]
    ax.plot(l0, [r["c_dec"] for r in runs], "o-", color="#4477aa", label="c_dec")
    ax.set(xscale="log", xlabel="L0", ylabel="c_dec")
    twin = ax.twinx()
    twin.plot(l0, [r["nth_projection"] for r in runs], "s--", color="#ee6677", label="n-th decoder projection")
    twin.set_ylabel("n-th decoder projection")
    ax.axvline(result["l0"], color="k", lw=0.8, ls=":")
    ax.set_title(f"{result['proxy']} points at L0 = {result['l0']:.2f}")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.9), fontsize=8)
    paths.append(_save(plt, fig, folder / "sweep.png"))
    return paths
