"""What `python -m sae eval` and `python -m sae l0-sweep` run (their options are in sae/__main__.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from ..data import ShardSource
from ..formats import load
from ..harvest import HarvestedActivations, token_batches
from ..registry import ARCHITECTURES
from ..synthetic import SyntheticActivations, SyntheticSource
from ..trainer import TrainConfig
from .concepts import coverage, label_reconstruction, sparse_probing
from .cone import cone_containment
from .consistency import consistency
from .dashboard import latent_records, write_dashboard
from .fidelity import ce_loss_recovered
from .monosemanticity import monosemanticity
from .reconstruction import reconstruction
from .report import load_array, write_report, write_sweep
from .sweep import PROXIES, l0_sweep


def _load_sae(path: str, device: str):
    model = load(path, device=device)
    if isinstance(model, dict):
        raise SystemExit(f"error: {path} holds several SAEs ({', '.join(model)}): pass one of their folders")
    return model.eval()


def _rows_of(name: str, t: torch.Tensor, N: int) -> torch.Tensor:
    if t.shape[0] < N:
        raise SystemExit(f"error: --{name} has {t.shape[0]} rows, fewer than the {N} activation rows")
    return t[:N]


def _language_model(name: str, device: str):
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SystemExit("error: --model needs the `transformers` package") from e
    tokenizer = AutoTokenizer.from_pretrained(name)
    lm = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
    return lm, tokenizer


def run_eval(opts: dict, texts=None) -> dict:
    """Evaluate the SAE at opts["path"] with every metric its inputs allow; write the report and the dashboard
    into opts["out_dir"]. texts: the documents of --text (an iterable of strings), for the CE loss."""
    device, bs, progress = opts["device"], opts["batch_size"], opts["progress"]
    model = _load_sae(opts["path"], device)
    labels = directions = tokens = None
    if opts["data"] == "synthetic":
        d = opts["synthetic_d"] or model.d_in
        gen = SyntheticActivations(
            d,
            opts["synthetic_features"],
            opts["synthetic_l0"],
            correlation=opts["synthetic_correlation"],
            seed=opts["seed"],
        )
        acts, true = gen.sample(opts["max_tokens"], torch.Generator().manual_seed(opts["seed"] + 7))
        labels, directions = true > 0, gen.features  # the true features: known concepts and directions
        data = f"synthetic (d={d}, {opts['synthetic_features']} features, L0 {opts['synthetic_l0']})"
    else:
        acts = HarvestedActivations(opts["data"], batch_size=bs, max_tokens=opts["max_tokens"])
        tokens, data = acts.tokens, opts["data"]
    d_acts = acts.shape[1] if isinstance(acts, torch.Tensor) else acts.d
    if d_acts != model.d_in:
        raise SystemExit(f"error: the activations have d={d_acts}, the SAE reads d_in={model.d_in}")
    N = len(acts)
    if opts["labels"]:
        labels = _rows_of("labels", load_array(opts["labels"]).bool(), N)
    if opts["directions"]:
        directions = load_array(opts["directions"]).float()
    report = {"sae": opts["path"], "data": data}
    report["reconstruction"] = reconstruction(model, acts, batch_size=bs, progress=progress)
    if labels is not None:
        report["coverage"] = coverage(model, acts, labels, batch_size=bs, progress=progress)
        report["label_reconstruction"] = label_reconstruction(model, acts, labels, batch_size=bs, progress=progress)
        report["sparse_probing"] = sparse_probing(model, acts, labels, batch_size=bs, progress=progress)
    if directions is not None:
        report["cone"] = cone_containment(model, directions)
    if opts["embeddings"]:
        emb = _rows_of("embeddings", load_array(opts["embeddings"]).float(), N)
        ms = monosemanticity(model, acts, emb, batch_size=bs, progress=progress)
        report["monosemanticity"] = {"mean": ms.nanmean().item(), "median": ms.nanmedian().item(), "per_latent": ms}
    if opts["compare"]:
        report["consistency"] = consistency(model, _load_sae(opts["compare"], device))
    lm = decode = None
    if opts["model"]:
        lm, tokenizer = _language_model(opts["model"], device)
        decode = lambda ids: [tokenizer.decode([i]) for i in ids]
        if texts is not None:
            if not opts["module"]:
                raise SystemExit("error: the CE loss needs --module (the module the SAE reads)")
            windows = list(
                itertools.islice(
                    token_batches(texts, tokenizer, context=opts["context"], batch_size=1), opts["windows"]
                )
            )
            if not windows:
                raise SystemExit(f"error: --text holds no window of --context {opts['context']} tokens")
            ids = torch.cat(windows)
            try:
                report["fidelity"] = ce_loss_recovered(lm, opts["module"], model, ids, progress=progress)
            except ValueError as e:
                raise SystemExit(f"error: --module: {e}") from None
    records = latent_records(
        model,
        acts,
        latents=range(min(opts["latents"], model.d_sae)),
        n_examples=opts["examples"],
        before=opts["before"],
        after=opts["after"],
        tokens=tokens,
        decode=decode,
        lm=lm,
        batch_size=bs,
        progress=progress,
    )
    out = Path(opts["out_dir"])
    paths = write_report(report, out) + list(write_dashboard(records, out, title=f"SAE latents: {opts['path']}"))
    rec = report["reconstruction"]
    print(
        f"{N} tokens: FVU {rec['fvu']:.4f}  L0 {rec['l0']:.2f}  dead {100 * rec['dead_fraction']:.1f}%  "
        f"dense {100 * rec['dense_fraction']:.1f}%"
        + (f"\n  coverage {report['coverage']['coverage']:.4f}" if "coverage" in report else "")
        + (
            f"\n  cone containment (s={report['cone']['sizes'][-1]}) {report['cone']['mean'][-1]:.4f}"
            if "cone" in report
            else ""
        )
        + (f"\n  CE loss recovered {report['fidelity']['ce_recovered_zero']:.4f}" if "fidelity" in report else "")
        + f"\n  wrote {', '.join(p.name for p in paths)} to {out}"
    )
    return report


def run_sweep(opts: dict) -> dict:
    """Train the sweep of opts["values"] and write sweep.json / .md / .png into opts["out_dir"]."""
    if opts["arch"] not in ARCHITECTURES:
        raise SystemExit(f"error: --arch {opts['arch']!r}: expected one of {', '.join(ARCHITECTURES)}")
    if opts["proxy"] not in PROXIES:
        raise SystemExit(f"error: --proxy {opts['proxy']!r}: expected one of {', '.join(PROXIES)}")
    if len(opts["values"]) < 3:
        raise SystemExit(f"error: --values needs at least 3 points, got {opts['values']}")
    if opts["data"] == "synthetic":
        gen = SyntheticActivations(
            opts["synthetic_d"],
            opts["synthetic_features"],
            opts["synthetic_l0"],
            correlation=opts["synthetic_correlation"],
            exact_l0=opts["synthetic_exact_l0"],
            orthogonal=opts["synthetic_orthogonal"],
            seed=opts["seed"],
        )
        source = SyntheticSource(gen, opts["batch_size"], seed=opts["seed"])
    else:
        source = ShardSource(opts["data"], opts["batch_size"], seed=opts["seed"])
    config = TrainConfig(
        steps=opts["steps"], lr=opts["lr"], lr_warmup_steps=opts["lr_warmup_steps"], seed=opts["seed"], progress=False
    )

    def report(run):
        if opts["progress"]:
            print(
                f"  {opts['param']}={run['value']}: L0 {run['l0']:.2f}  FVU {run['fvu']:.4f}  "
                f"c_dec {run['c_dec']:.4f}  n-th projection {run['nth_projection']:.4f}",
                flush=True,
            )

    result = l0_sweep(
        source,
        opts["values"],
        arch=opts["arch"],
        param=opts["param"],
        d_sae=opts["d_sae"],
        config=config,
        model_kwargs=opts["model_kwargs"],
        eval_tokens=opts["eval_tokens"],
        nth=opts["nth"] or None,
        proxy=opts["proxy"],
        device=opts["device"],
        seed=opts["seed"],
        on_run=report,
    )
    paths = write_sweep(result, opts["out_dir"])
    edge = " (on the grid's edge: widen the sweep)" if result["at_edge"] else ""
    print(
        f"{result['proxy']} points at L0 = {result['l0']:.2f}{edge}; the n-th decoder projection at "
        f"{result['l0_nth_projection']:.2f}\n  wrote {', '.join(p.name for p in paths)} to {opts['out_dir']}"
    )
    return result
