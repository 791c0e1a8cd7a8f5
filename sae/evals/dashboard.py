"""Each latent's top-activating examples, as JSON for automated explainers and as a static HTML dashboard.

JSON layout (`FORMAT`), one record per latent; the field names follow EleutherAI's delphi (activating examples:
str tokens with one activation per token) and Neuronpedia's feature pages (activation records with the peak's
index, frac_nonzero, positive and negative logits):

    {"format": "sae-kernels/latents-1", "tokens": N, "d_sae": n, "context": {"before": 8, "after": 4},
     "latents": [{
        "latent": 17,                      # the latent id
        "density": 0.0123,                 # fraction of the N tokens it fires on (Neuronpedia's frac_nonzero)
        "max_activation": 4.2,             # its largest activation (0 when it never fired)
        "examples": [{                     # its top-activating tokens, largest first
            "row": 1234,                   # the token's row in the activations
            "activation": 4.2,             # the latent's activation there
            "sequence": 12, "position": 40,        # its window and position (harvests with token files)
            "token_ids": [...], "tokens": ["The", " cat", ...],   # the context: before + 1 + after tokens
            "activations": [0.0, ..., 4.2, ...],    # the latent's activation on each context token
            "max_index": 8}],              # the example's token inside the context
        "top_logits": [{"token": " cat", "id": 3797, "value": 0.83}, ...],   # given a language model:
        "bottom_logits": [...]}]}          # the tokens W_dec,i W_U^T raises (lowers) most

Without token files (activations that did not come from text) a context is the example's row alone, its token
"#<row>". The dashboard is one self-contained HTML file: a card per latent, a search box that shows the card of
the latent id typed in.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import metrics
from ..atomic import atomic_write
from .stream import Acts, encoded, entries, inference

FORMAT = "sae-kernels/latents-1"


@torch.no_grad()
def top_activations(model, acts: Acts, *, n_examples: int = 10, batch_size: int = 4096, progress: bool = False):
    """One pass over acts: each latent's n_examples largest activations and their rows.

    Returns values [d_sae, m] fp32 (descending; -inf past a latent's firings), rows [d_sae, m] int64 (-1 there;
    equal values keep the earlier row), counts [d_sae] int64 (tokens each latent fires on) and tokens (N).
    """
    if not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples must be a positive int, got {n_examples!r}")
    n, m, dev = model.d_sae, n_examples, model.device
    best_v = torch.full((n, m), -float("inf"), device=dev)
    best_r = torch.full((n, m), -1, dtype=torch.long, device=dev)
    counts = torch.zeros(n, dtype=torch.long, device=dev)
    N = 0
    for offset, x, code in encoded(model, acts, batch_size, progress=progress, desc="top activations"):
        N += x.shape[0]
        counts += metrics.firing_counts(code, n)
        rows, latents, values = entries(code)
        order = values.argsort(descending=True, stable=True)
        order = order[latents[order].argsort(stable=True)]  # by latent, then value descending, then row
        rows, latents, values = rows[order] + offset, latents[order], values[order]
        start = torch.bincount(latents, minlength=n).cumsum(0) - torch.bincount(latents, minlength=n)
        rank = torch.arange(latents.numel(), device=dev) - start[latents]
        keep = rank < m
        cand_v = torch.full((n, m), -float("inf"), device=dev)
        cand_r = torch.full((n, m), -1, dtype=torch.long, device=dev)
        cand_v[latents[keep], rank[keep]] = values[keep]
        cand_r[latents[keep], rank[keep]] = rows[keep]
        both_v, both_r = torch.cat([best_v, cand_v], 1), torch.cat([best_r, cand_r], 1)
        both_v, j = both_v.sort(dim=1, descending=True, stable=True)
        best_v, best_r = both_v[:, :m], both_r.gather(1, j[:, :m])
    return {"values": best_v.cpu(), "rows": best_r.cpu(), "counts": counts.cpu(), "tokens": N}


def _row_reader(acts) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(acts, torch.Tensor):
        return lambda idx: acts[idx.to(acts.device)]
    if hasattr(acts, "rows"):
        return acts.rows
    raise TypeError(
        "latent_records reads context rows by index (random access): pass a tensor or sae.harvest.HarvestedActivations"
    )


def _logit_records(model, lm, latents: list[int], n_logits: int, decode) -> tuple[list, list]:
    W_U = lm.get_output_embeddings().weight.detach()
    if W_U.shape[1] != model.d_out:
        raise ValueError(f"the language model's unembedding has d={W_U.shape[1]}, the SAE writes d_out={model.d_out}")
    top, bottom = [], []
    for a in range(0, len(latents), 256):
        ids = torch.tensor(latents[a : a + 256], device=model.device)
        scores = model.W_dec.detach()[ids].float() @ W_U.to(model.device).float().T  # [b, V]
        for part, largest in ((top, True), (bottom, False)):
            v, i = scores.topk(min(n_logits, scores.shape[1]), dim=1, largest=largest)
            for vs, ix in zip(v.tolist(), i.tolist()):
                part.append([{"token": t, "id": j, "value": x} for t, j, x in zip(decode(ix), ix, vs)])
    return top, bottom


@torch.no_grad()
def latent_records(
    model,
    acts: Acts,
    *,
    latents: Sequence[int] | None = None,
    n_examples: int = 10,
    before: int = 8,
    after: int = 4,
    tokens: dict | None = None,
    decode: Callable[[list[int]], list[str]] | None = None,
    lm=None,
    n_logits: int = 10,
    batch_size: int = 4096,
    progress: bool = False,
) -> dict:
    """The JSON layout of the module docstring for `latents` (default: all).

    acts: [N, d_in] tensor or `sae.harvest.HarvestedActivations` (contexts need random access to rows);
    tokens: {"token_ids", "sequence", "position"} [N] each (`HarvestedActivations.tokens`; None: no contexts);
    decode: token ids -> strings (e.g. a tokenizer's per-id decode); lm: a language model whose output
    embeddings give the top and bottom logits.
    """
    read = _row_reader(acts)
    top = top_activations(model, acts, n_examples=n_examples, batch_size=batch_size, progress=progress)
    N, n = top["tokens"], model.d_sae
    latents = list(range(n)) if latents is None else [int(i) for i in latents]
    if any(not 0 <= i < n for i in latents):
        raise ValueError(f"latents must be ids in [0, d_sae={n})")
    if tokens is not None and any(v.shape[0] != N for v in tokens.values()):
        raise ValueError(f"tokens must hold one entry per activation row ({N})")
    decode = decode or (lambda ids: [str(i) for i in ids])
    windows = {}  # example row -> its context rows
    for i in latents:
        for r in top["rows"][i].tolist():
            if r < 0 or r in windows:
                continue
            if tokens is None:
                windows[r] = [r]
                continue
            cand = torch.arange(max(r - before, 0), min(r + after + 1, N))
            windows[r] = cand[tokens["sequence"][cand] == tokens["sequence"][r]].tolist()
    need = sorted({c for w in windows.values() for c in w})
    where = {r: j for j, r in enumerate(need)}
    codes = []
    with inference(model):
        for a in range(0, len(need), batch_size):
            x = read(torch.tensor(need[a : a + batch_size], dtype=torch.long)).to(model.device)
            codes.append(model.encode_sparse(x))
    values = torch.cat([c.values.float() for c in codes]).cpu() if codes else torch.zeros(0, 1)
    indices = torch.cat([c.indices.long() for c in codes]).cpu() if codes else torch.zeros(0, 1, dtype=torch.long)
    if lm is not None:
        top_logits, bottom_logits = _logit_records(model, lm, latents, n_logits, decode)
    records = []
    for li, i in enumerate(latents):
        examples = []
        for v, r in zip(top["values"][i].tolist(), top["rows"][i].tolist()):
            if r < 0:
                break
            ctx = windows[r]
            rows = torch.tensor([where[c] for c in ctx])
            per_token = ((indices[rows] == i) * values[rows]).sum(1).tolist()
            ex = {"row": r, "activation": v}
            if tokens is not None:
                ids = tokens["token_ids"][ctx].tolist()
                ex.update(sequence=int(tokens["sequence"][r]), position=int(tokens["position"][r]))
                ex.update(token_ids=ids, tokens=decode(ids))
            else:
                ex["tokens"] = [f"#{r}"]
            ex.update(activations=per_token, max_index=ctx.index(r))
            examples.append(ex)
        rec = {
            "latent": i,
            "density": top["counts"][i].item() / max(N, 1),
            "max_activation": max(top["values"][i, 0].item(), 0.0),
            "examples": examples,
        }
        if lm is not None:
            rec.update(top_logits=top_logits[li], bottom_logits=bottom_logits[li])
        records.append(rec)
    return {
        "format": FORMAT,
        "tokens": N,
        "d_sae": n,
        "context": {"before": before, "after": after},
        "latents": records,
    }


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; color: #222; }
header { position: sticky; top: 0; background: #fafafa; padding: .5rem 0; }
#search { font-size: 1rem; padding: .35rem .5rem; width: 14rem; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .75rem 1rem; margin: .75rem 0; }
.card h2 { font-size: 1.05rem; margin: 0 0 .4rem; }
.stats { color: #666; font-size: .85rem; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: .25rem 0; font-size: .85rem; }
.tok { border-radius: 2px; }
.peak { outline: 1px solid #c40; }
.logits { font-size: .85rem; color: #444; }
"""

_SCRIPT = """
const box = document.getElementById("search");
const cards = Array.from(document.querySelectorAll(".card"));
const status = document.getElementById("status");
function filter() {
  const q = box.value.trim();
  let shown = 0;
  for (const card of cards) {
    const on = q === "" || card.dataset.latent === q;
    card.style.display = on ? "" : "none";
    shown += on;
  }
  status.textContent = shown + " of " + cards.length + " latents";
}
box.addEventListener("input", filter);
filter();
"""


def _card(rec: dict) -> str:
    i, peak = rec["latent"], rec["max_activation"] or 1.0
    out = [f'<section class="card" id="latent-{i}" data-latent="{i}">', f"<h2>latent {i}</h2>"]
    out.append(
        f'<div class="stats">density {rec["density"]:.3g} &middot; max activation {rec["max_activation"]:.4g}</div>'
    )
    for ex in rec["examples"]:
        spans = []
        for j, (tok, act) in enumerate(zip(ex["tokens"], ex["activations"])):
            alpha = max(0.0, min(1.0, act / peak))
            cls = "tok peak" if j == ex["max_index"] else "tok"
            spans.append(
                f'<span class="{cls}" style="background: rgba(255, 120, 0, {alpha:.3f})" '
                f'title="{act:.4g}">{html.escape(tok)}</span>'
            )
        out.append(f'<div class="ctx">{"".join(spans)} <span class="stats">({ex["activation"]:.4g})</span></div>')
    for key, label in (("top_logits", "raises"), ("bottom_logits", "lowers")):
        if key in rec:
            toks = ", ".join(f"{html.escape(repr(t['token']))} {t['value']:+.3g}" for t in rec[key])
            out.append(f'<div class="logits">{label}: {toks}</div>')
    out.append("</section>")
    return "\n".join(out)


def dashboard_html(data: dict, *, title: str = "SAE latents") -> str:
    """One self-contained HTML page (inline style and script) of `latent_records`' output: a card per latent
    (density, max activation, the examples' contexts shaded by activation, the top logits) and a search box
    (id "search") that shows only the card of the latent id typed in (all cards when empty)."""
    cards = "\n".join(_card(rec) for rec in data["latents"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        f"<header><h1>{html.escape(title)}</h1>"
        '<label>latent id <input id="search" type="search" inputmode="numeric" autocomplete="off"></label> '
        f'<span id="status" class="stats"></span> <span class="stats">{data["tokens"]} tokens, '
        f"{data['d_sae']} latents</span></header>\n<main>\n{cards}\n</main>\n<script>{_SCRIPT}</script></body></html>\n"
    )


def write_dashboard(data: dict, folder, *, title: str = "SAE latents") -> tuple:
    """Write latents.json (the JSON layout) and dashboard.html into folder; returns both paths."""
    folder = Path(folder)
    text = json.dumps(data)
    page = dashboard_html(data, title=title)
    j = atomic_write(folder / "latents.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    h = atomic_write(folder / "dashboard.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return j, h
