"""`python -m sae train`, `harvest`, `eval` and `l0-sweep`.

Options come from defaults, then a JSON config file (--config; keys are the option names with
underscores), then the flags given. With no options, `train` fits a TopK SAE to synthetic activations with
known features and reports how well it recovers them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys

import torch

from .registry import ARCHITECTURES
from .trainer import TrainConfig, Trainer

TRAIN_DEFAULTS = {
    "arch": "topk",
    "d_sae": None,
    "expansion": 4,
    "k": 8,
    "model_kwargs": {},
    "data": "synthetic",
    "batch_size": 1024,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "synthetic_d": 32,
    "synthetic_features": 128,
    "synthetic_l0": 8.0,
    "synthetic_correlation": 0.0,
    "resume": False,
    "buffer_tokens": 1 << 16,
    "latent_shards": 1,
    "model": None,
    "module": None,
    "target_module": None,
    "skip": False,
    "text": None,
    "dataset": None,
    "split": "train",
    "column": "text",
    "streaming": False,
    "context": 128,
    "prepend_bos": True,
    "model_batch_size": 8,
    "model_dtype": "float32",
    **{f.name: f.default for f in dataclasses.fields(TrainConfig)},
}

HARVEST_DEFAULTS = {
    "model": None,
    "module": None,
    "text": None,
    "out_dir": "activations",
    "context": 128,
    "batch_size": 8,
    "max_tokens": 1 << 20,
    "shard_tokens": 1 << 16,
    "format": "safetensors",
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "dtype": "float32",
    "target_module": None,
    "dataset": None,
    "split": "train",
    "column": "text",
    "streaming": False,
    "prepend_bos": True,
}

TEXT_HELP = {  # the options that feed a model with text (harvest, and train from a running model)
    "target_module": "transcoders: the module whose output is the target (e.g. 'h.3.mlp' with --module "
    "'h.3.ln_2'); (input, target) pairs, the targets beside the inputs",
    "text": "a .txt file (one document per line) or .jsonl file (a 'text' field per line)",
    "dataset": "a Hugging Face dataset: a local .parquet / .json / .jsonl / .csv / .arrow / .txt file, a folder of "
    "them or one written by save_to_disk, or a Hub name (needs the `datasets` package)",
    "split": "the dataset's split",
    "column": "the dataset's text column",
    "streaming": "stream the dataset instead of loading (and caching) it whole",
    "prepend_bos": "start each context window with BOS and separate documents by BOS, as SAELens does",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


NONE_DEFAULT_TYPES = {"d_sae": int, "sparsity_warmup_steps": int, "p_end": float, "dead_tokens": int, "out_dir": str}


def _add_options(parser: argparse.ArgumentParser, defaults: dict, helps: dict) -> None:
    """One --flag per option; its type follows the default's (JSON for dicts and tuples)."""
    parser.add_argument("--config", help="JSON file of options, keys as the flags with underscores (flags override it)")
    for name, default in defaults.items():
        if isinstance(default, bool):
            kind = _bool
        elif isinstance(default, (dict, tuple, list)):
            kind = json.loads
        elif isinstance(default, (int, float)):
            kind = type(default)
        else:
            kind = NONE_DEFAULT_TYPES.get(name)
        flag = "--" + name.replace("_", "-")
        text = f"{helps[name]} (default: {default!r})".replace("%", "%%")
        parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=text)


def _options(args: argparse.Namespace, defaults: dict) -> dict:
    opts = dict(defaults)
    if getattr(args, "config", None):
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
        unknown = sorted(set(config) - set(defaults))
        if unknown:
            raise SystemExit(f"error: unknown options in {args.config}: {unknown}")
        opts.update(config)
    opts.update({k: v for k, v in vars(args).items() if k in defaults})
    return opts


TRAIN_HELP = {
    "arch": f"architecture: {', '.join(ARCHITECTURES)}",
    "d_sae": "number of latents (default: expansion * d_in)",
    "expansion": "latents per input dimension, when --d-sae is not given",
    "k": "active latents per token (TopK-family architectures)",
    "model_kwargs": "extra constructor arguments as JSON, e.g. '{\"l1_coeff\": 5.0}'",
    "data": "'synthetic' or a folder of .npy / .safetensors activation shards",
    "batch_size": "tokens per step",
    "device": "cpu or cuda",
    "synthetic_d": "synthetic data: input dimension",
    "synthetic_features": "synthetic data: number of true features",
    "synthetic_l0": "synthetic data: mean true features per token",
    "synthetic_correlation": "synthetic data: correlation between feature firings",
    "resume": "continue from the latest checkpoint in out_dir",
    "buffer_tokens": "shard data: shuffle buffer size in tokens",
    "latent_shards": "split the latents over this many ranks (under torchrun --nproc-per-node N; the N / S data "
    "groups split each batch); torchrun alone trains data-parallel",
    "model": "train from a running model (no stored activations): Hugging Face model name or path",
    "module": "with --model: the module whose output the SAE reads, as in model.named_modules(), e.g. 'h.6'",
    "skip": "add a skip connection W_skip (transcoders: skip transcoders)",
    "context": "with --model: tokens per window",
    "model_batch_size": "with --model: windows per forward pass of the model",
    "model_dtype": "with --model: the model's dtype: float32, float16 or bfloat16",
    **TEXT_HELP,
    **{f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)},
}


def build_model(opts: dict, d_in: int, mesh=None, d_out: int | None = None) -> torch.nn.Module:
    """The SAE the options describe; d_out: the targets' width for a transcoder (no input centering)."""
    arch = opts["arch"]
    if arch not in ARCHITECTURES:
        raise SystemExit(f"error: --arch {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    d_sae = opts["d_sae"] or opts["expansion"] * d_in
    kwargs = {"skip": opts["skip"]} | ({"d_out": d_out, "apply_b_dec_to_input": False} if d_out else {})
    kwargs |= opts["model_kwargs"]
    if "k" in inspect.signature(cls).parameters:
        kwargs.setdefault("k", opts["k"])
    if mesh is not None:
        from .distributed import shard_model

        return shard_model(cls, d_in, d_sae, mesh, device=opts["device"], **kwargs)
    return cls(d_in, d_sae, device=opts["device"], **kwargs)


def train(opts: dict) -> dict:
    from .data import ShardSource
    from .synthetic import SyntheticActivations, SyntheticSource, feature_recovery

    mesh = None
    if opts["latent_shards"] > 1 or os.environ.get("WORLD_SIZE"):  # started by torchrun: sae.distributed
        from .distributed import DistributedTrainer, close, init_mesh

        try:
            mesh = init_mesh(opts["latent_shards"], opts["device"])
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: --latent-shards {opts['latent_shards']}: {e}") from None
    eval_fn = None
    if opts["data"] == "synthetic" and not opts["model"]:
        gen = SyntheticActivations(
            opts["synthetic_d"],
            opts["synthetic_features"],
            opts["synthetic_l0"],
            correlation=opts["synthetic_correlation"],
            seed=opts["seed"],
        )
        source = SyntheticSource(gen, opts["batch_size"], seed=opts["seed"])
        eval_fn = lambda m: {
            "recovery": feature_recovery(m.W_dec if mesh is None else m.W_dec.full_tensor(), gen.features)
        }
    elif opts["model"]:
        from .harvest import HarvestSource

        harvester, batches = _model_text(opts, opts["model_batch_size"], getattr(torch, opts["model_dtype"]), "train")
        source = HarvestSource(
            harvester, batches, opts["batch_size"], buffer_tokens=opts["buffer_tokens"], seed=opts["seed"]
        )
    else:
        source = ShardSource(opts["data"], opts["batch_size"], buffer_tokens=opts["buffer_tokens"], seed=opts["seed"])
    torch.manual_seed(opts["seed"])
    model = build_model(opts, source.d_in, mesh, source.d_out)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in opts.items() if k in fields})
    trainer = Trainer if mesh is None else DistributedTrainer
    summary = trainer(model, source, config, eval_fn=eval_fn).fit(resume=opts["resume"])
    if mesh is not None:
        close()
        if os.environ.get("RANK", "0") != "0":
            return summary
    e = summary["eval"]
    print(
        f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']:.1f} s "
        f"({summary['tokens_per_s'] / 1e3:.1f}k tokens/s)\n"
        f"  L0 {e['l0']:.2f}  FVU {e['fvu']:.4f}  explained variance {e['explained_variance']:.4f}  "
        f"dead {100 * e['dead_fraction']:.1f}%  c_dec {e['c_dec']:.4f}"
        + (f"\n  feature recovery (mean max |cos|) {e['recovery']:.4f}" if "recovery" in e else "")
        + (f"\n  saved {summary['export']}" if "export" in summary else "\n  not saved: pass --out-dir")
    )
    return summary


def _texts(path: str):
    """Lines of a .txt file, or the "text" field of each line of a .jsonl file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"] if path.endswith(".jsonl") else line.rstrip("\n")


def _model_text(opts: dict, batch_size: int, dtype: torch.dtype, command: str):
    """(Harvester of --module [and --target-module] of --model, re-iterable of [batch_size, context] input ids
    of --text or --dataset)."""
    from . import corpus
    from .harvest import Harvester

    for name in ("model", "module"):
        if not opts[name]:
            raise SystemExit(f"error: {command} needs --{name}")
    if not (opts["text"] or opts["dataset"]):
        raise SystemExit(f"error: {command} needs --text or --dataset")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"error: {command} from a named model needs the `transformers` package") from e
    tokenizer = AutoTokenizer.from_pretrained(opts["model"])
    model = AutoModel.from_pretrained(opts["model"], dtype=dtype).to(opts["device"])
    try:
        harvester = Harvester(model, opts["module"], target_module=opts["target_module"], dtype=dtype)
    except ValueError as e:
        flag = "--target-module" if str(e).startswith("target_module") else "--module"
        raise SystemExit(f"error: {flag}: {e}") from None
    if opts["dataset"]:
        try:
            ds = corpus.load_dataset(opts["dataset"], split=opts["split"], streaming=opts["streaming"])
        except (ImportError, ValueError) as e:
            raise SystemExit(f"error: --dataset: {e}") from None
        docs = lambda: corpus.texts(ds, opts["column"])
    else:
        docs = lambda: _texts(opts["text"])
    batches = corpus.TokenBatches(
        docs, tokenizer, context=opts["context"], batch_size=batch_size, prepend_bos=opts["prepend_bos"]
    )
    return harvester, batches


def harvest(opts: dict) -> list:
    from .harvest import harvest_to_shards

    harvester, batches = _model_text(opts, opts["batch_size"], getattr(torch, opts["dtype"]), "harvest")
    paths = harvest_to_shards(
        harvester,
        batches,
        opts["out_dir"],
        shard_tokens=opts["shard_tokens"],
        max_tokens=opts["max_tokens"],
        suffix="." + opts["format"],
    )
    print(f"wrote {len(paths)} shards to {opts['out_dir']}")
    return paths


HARVEST_HELP = {
    "model": "Hugging Face model name or local path",
    "module": "dotted module name to hook, as in model.named_modules(), e.g. 'encoder.layer.3' or 'layers.6'",
    "out_dir": "folder for the shards (and targets/ with --target-module)",
    "context": "tokens per window",
    "batch_size": "windows per forward pass",
    "max_tokens": "stop after this many tokens",
    "shard_tokens": "tokens per shard",
    "format": "shard format: safetensors or npy",
    "device": "cpu or cuda",
    "dtype": "activation dtype: float32, float16 or bfloat16",
    **TEXT_HELP,
}


_SYNTHETIC = ("synthetic_features", "synthetic_l0", "synthetic_correlation", "seed")

EVAL_DEFAULTS = {
    "data": "synthetic",
    "labels": None,
    "directions": None,
    "embeddings": None,
    "compare": None,
    "model": None,
    "module": None,
    "text": None,
    "context": 128,
    "windows": 64,
    "out_dir": "eval",
    "max_tokens": 1 << 16,
    "batch_size": 4096,
    "latents": 128,
    "examples": 10,
    "before": 8,
    "after": 4,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "progress": True,
    "synthetic_d": 0,
    **{k: TRAIN_DEFAULTS[k] for k in _SYNTHETIC},
}

EVAL_HELP = {
    "data": "'synthetic' (fresh samples of the ground truth; labels and directions are its true features) or a "
    "harvest folder (shards in order, with token files for contexts)",
    "labels": "concept labels [N, C] bool (.npy, .pt or .safetensors): coverage, label reconstruction, sparse probing",
    "directions": "reference concept directions [C, d] (.npy, .pt or .safetensors): concept-cone containment",
    "embeddings": "embeddings of the inputs [N, e] (.npy, .pt or .safetensors): monosemanticity",
    "compare": "a second SAE: feature consistency (mean max cosine, optimal matching, per index)",
    "model": "Hugging Face causal LM (name or path): top logits per latent, token strings; with --text and "
    "--module, CE loss recovered and KL",
    "module": "the module the SAE reads, as in the model's (or its base model's) named_modules(), e.g. 'h.6'",
    "text": "a .txt file (one document per line) or .jsonl file (a 'text' field per line) for the CE loss",
    "context": "tokens per window for the CE loss",
    "windows": "windows of --text for the CE loss",
    "out_dir": "folder for report.json, report.md, the PNG plots, latents.json and dashboard.html",
    "max_tokens": "activation rows evaluated (the first ones of --data)",
    "batch_size": "activation rows per batch",
    "latents": "latents in latents.json and the dashboard (ids 0 .. latents-1)",
    "examples": "top-activating examples per latent",
    "before": "context tokens shown before an example's token",
    "after": "context tokens shown after an example's token",
    "device": "cpu or cuda",
    "progress": "show progress bars",
    "synthetic_d": "synthetic data: input dimension (0: the SAE's d_in)",
    **{k: TRAIN_HELP[k] for k in _SYNTHETIC},
}


def evaluate(opts: dict) -> dict:
    from .evals.cli import run_eval

    return run_eval(opts, texts=_texts(opts["text"]) if opts["text"] else None)


SWEEP_DEFAULTS = {
    "arch": "topk",
    "param": "k",
    "values": [2, 3, 4, 6, 8, 11, 16],
    "d_sae": None,
    "model_kwargs": {},
    "data": "synthetic",
    "steps": 400,
    "batch_size": 256,
    "lr": 3e-3,
    "lr_warmup_steps": 20,
    "eval_tokens": 4096,
    "nth": 0,
    "proxy": "c_dec",
    "out_dir": "l0-sweep",
    "device": "cuda" if torch.cuda.is_available() else "cpu",
    "seed": 0,
    "progress": True,
    "synthetic_d": 32,
    "synthetic_features": 32,
    "synthetic_l0": 5.0,
    "synthetic_correlation": 0.4,
    "synthetic_exact_l0": True,
    "synthetic_orthogonal": True,
}

SWEEP_HELP = {
    "arch": f"architecture: {', '.join(ARCHITECTURES)}",
    "param": "the swept constructor argument: k (TopK family) or a sparsity coefficient, e.g. l0_coeff (JumpReLU)",
    "values": "the sweep's grid of --param values, as JSON",
    "d_sae": "number of latents (default: 4 * d_in)",
    "model_kwargs": "extra constructor arguments as JSON",
    "data": "'synthetic' or a folder of .npy / .safetensors activation shards",
    "steps": "optimizer steps per run",
    "batch_size": "tokens per step",
    "lr": "peak learning rate (Adam)",
    "lr_warmup_steps": "linear learning-rate warmup",
    "eval_tokens": "held-out rows for L0, FVU and the n-th decoder projection",
    "nth": "n of the n-th decoder projection (0: d_sae // 4)",
    "proxy": "the proxy whose minimum gives the reported L0: c_dec or nth_projection",
    "out_dir": "folder for sweep.json, sweep.md and sweep.png",
    "device": "cpu or cuda",
    "seed": "random seed (initialisation, data)",
    "progress": "print each run's numbers",
    "synthetic_d": "synthetic data: input dimension",
    "synthetic_features": "synthetic data: number of true features",
    "synthetic_l0": "synthetic data: the true L0 (active features per token)",
    "synthetic_correlation": "synthetic data: correlation between feature firings",
    "synthetic_exact_l0": "synthetic data: every token has exactly round(L0) active features",
    "synthetic_orthogonal": "synthetic data: orthonormal features (needs features <= d)",
}


def l0_sweep(opts: dict) -> dict:
    from .evals.cli import run_sweep

    return run_sweep(opts)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The CLI's parser and its subcommands' parsers."""
    parser = argparse.ArgumentParser(prog="python -m sae", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train an SAE", description="Train an SAE (sae.Trainer).")
    _add_options(p_train, TRAIN_DEFAULTS, TRAIN_HELP)
    p_harvest = sub.add_parser("harvest", help="write activation shards from a model over text")
    _add_options(p_harvest, HARVEST_DEFAULTS, HARVEST_HELP)
    p_eval = sub.add_parser("eval", help="evaluate an SAE: report, plots and a latent dashboard")
    p_eval.add_argument("path", help="the SAE: a folder or file sae.load reads")
    _add_options(p_eval, EVAL_DEFAULTS, EVAL_HELP)
    p_sweep = sub.add_parser("l0-sweep", help="train a sweep over k and read the L0 the c_dec proxy points at")
    _add_options(p_sweep, SWEEP_DEFAULTS, SWEEP_HELP)
    return parser, {"train": p_train, "harvest": p_harvest, "eval": p_eval, "l0-sweep": p_sweep}


def main(argv: list[str] | None = None) -> int:
    args = build_parser()[0].parse_args(argv)
    if args.command == "train":
        train(_options(args, TRAIN_DEFAULTS))
    elif args.command == "harvest":
        harvest(_options(args, HARVEST_DEFAULTS))
    elif args.command == "eval":
        evaluate({**_options(args, EVAL_DEFAULTS), "path": args.path})
    else:
        l0_sweep(_options(args, SWEEP_DEFAULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
