"""The L0 sweep of Chanin and Garriga-Alonso, "Sparse but Wrong: Incorrect L0 Leads to Incorrect Features in
Sparse Autoencoders": train short SAEs over a grid of k (or of a sparsity coefficient), and read the L0 the
decoder-geometry proxies point at.

Too low an L0 makes latents absorb correlated features; too high a one finds degenerate mixtures. Either way the
decoder rows grow less orthogonal, so c_dec = mean_{i<j} |cos(W_dec,i, W_dec,j)| (`sae.metrics.c_dec`) is lowest
near the true L0. The n-th decoder projection score (`sae.metrics.nth_decoder_projection`: the value above which
the inputs' projections onto the decoder rows put n entries per token) is the second proxy. The pointed L0 is the
vertex of the parabola through the grid's minimum and its two neighbours, in log L0 (the grid's minimum itself
when it lies on the grid's edge: widen the grid then).
"""

from __future__ import annotations

import math

import torch

from .. import metrics
from ..data import Source
from ..registry import architecture
from ..trainer import TrainConfig, Trainer

PROXIES = ("c_dec", "nth_projection")


def pointed_l0(l0s, scores) -> tuple[float, bool]:
    """(the L0 a proxy points at, whether its minimum lies on the grid's edge). l0s: increasing measured L0s,
    scores: the proxy at each."""
    pairs = sorted(zip(l0s, scores))
    if len(pairs) < 3:
        raise ValueError(f"a sweep needs at least 3 points, got {len(pairs)}")
    x = [math.log(p[0]) for p in pairs]
    y = [p[1] for p in pairs]
    j = min(range(len(y)), key=y.__getitem__)
    if j in (0, len(y) - 1):
        return pairs[j][0], True
    (x0, x1, x2), (y0, y1, y2) = x[j - 1 : j + 2], y[j - 1 : j + 2]
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        return pairs[j][0], False
    vertex = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / den
    return math.exp(min(max(vertex, x0), x2)), False


def l0_sweep(
    source: Source,
    values,
    *,
    arch: str = "topk",
    param: str = "k",
    d_sae: int | None = None,
    config: TrainConfig | None = None,
    model_kwargs: dict | None = None,
    eval_tokens: int = 4096,
    nth: int | None = None,
    proxy: str = "c_dec",
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_run=None,
) -> dict:
    """Train one SAE per value of `param` (k for TopK; e.g. l0_coeff for JumpReLU) on `source`, each from the
    source's current position, and measure L0, FVU and both proxies on `eval_tokens` held-out rows.

    d_sae: latents (default 4 d_in); nth: the n of the n-th decoder projection (default d_sae // 4);
    on_run(run) is called after each run. Returns runs (value, l0, fvu, c_dec, nth_projection each), proxy,
    l0 (the pointed L0 of `proxy`), at_edge, and l0_c_dec / l0_nth_projection (what each proxy points at).
    """
    if proxy not in PROXIES:
        raise ValueError(f"proxy must be one of {PROXIES}, got {proxy!r}")
    cls = architecture(arch)
    d_sae = d_sae or 4 * source.d_in
    nth = d_sae // 4 if nth is None else nth
    config = config or TrainConfig(progress=False)
    start = source.state_dict()
    x = source.sample(eval_tokens).to(device)
    runs = []
    for value in values:
        source.load_state_dict(start)
        torch.manual_seed(seed)
        model = cls(source.d_in, d_sae, device=device, **{param: value, **(model_kwargs or {})})
        Trainer(model, source, config).fit()
        model.eval()
        with torch.no_grad():
            ev = metrics.evaluate(model, x)
            xn = model.normalize(x)
            b_dec = model.b_dec if model.apply_b_dec_to_input else None
            run = {
                "value": value,
                "l0": ev["l0"],
                "fvu": ev["fvu"],
                "c_dec": metrics.c_dec(model.W_dec, max_latents=8192),
                "nth_projection": metrics.nth_decoder_projection(xn, model.W_dec, b_dec, nth),
            }
        runs.append(run)
        if on_run is not None:
            on_run(run)
    source.load_state_dict(start)
    live = [r for r in runs if r["l0"] > 0]
    out = {"runs": runs, "param": param, "nth": nth, "proxy": proxy}
    for p in PROXIES:
        out[f"l0_{p}"], out[f"at_edge_{p}"] = pointed_l0([r["l0"] for r in live], [r[p] for r in live])
    out["l0"], out["at_edge"] = out[f"l0_{proxy}"], out[f"at_edge_{proxy}"]
    return out
