"""The SAE trainer: schedules, decoder constraint, dead-latent tracking, evaluation, logs and checkpoints.

Activations are normalised by the model's constant `act_scale`, set from a sample so that E||x|| = sqrt(d_in)
in the model's normalised space (losses are measured there) and folded into the weights when the model is
saved. One step: a raw [B, d_in] batch; `model.loss(x, dead_mask=...)` (AuxK where the class has it);
backward; the component of each W_dec row's gradient along the row removed; gradient clipping; Adam;
W_dec rows back to unit norm; tokens-since-fired updated from the step's SparseCode (indices only, so
no [B, d_sae] tensor is formed on the TopK / BatchTopK / JumpReLU path).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import metrics, runlog
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import Source, split_pairs
from .formats import save

SPARSITY_COEFFS = ("l1_coeff", "l0_coeff")  # scheduled by the sparsity warmup (and p-annealing)
C_DEC_LATENTS = 8192  # evaluate: c_dec on at most this many latents (a seeded subset)


def _opt(default, help: str):
    """A TrainConfig field: its default and its help text (the CLI's flags show both)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Training hyperparameters; every field has a default that trains. The CLI's defaults are these."""

    steps: int = _opt(2000, "optimizer steps")
    lr: float = _opt(3e-3, "peak learning rate (Adam)")
    lr_warmup_steps: int = _opt(100, "linear learning-rate warmup from lr / steps")
    lr_decay_frac: float = _opt(0.2, "linear decay to 0 over this final fraction of the steps")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam betas")
    grad_clip: float = _opt(1.0, "max global gradient norm; 0 turns clipping off")
    sparsity_warmup_steps: int | None = _opt(None, "sparsity coefficients ramp from 0 over these steps; None: 5%")
    normalize: bool = _opt(True, "set act_scale so that E||x|| = sqrt(d_in) (folded into the exported SAE)")
    init_b_dec: str = _opt("geometric_median", "initial b_dec: geometric_median, mean or zero")
    stats_tokens: int = _opt(4096, "sample for the normalisation, b_dec and the default evaluation set")
    unit_norm_decoder: bool = _opt(True, "keep decoder rows at unit norm")
    dead_tokens: int | None = _opt(
        None, "a latent is dead (AuxK revives it) after this many tokens without firing; None: a quarter of the "
        "run's tokens, at most 10M, so the window fits inside the run"
    )  # fmt: skip
    precision: str = _opt(
        "auto", "auto (bf16 on CUDA for an fp32 model, else fp32), fp32, or bf16: a bf16 compute copy with fp32 "
        "master weights and Adam"
    )  # fmt: skip
    p_end: float | None = _opt(None, "ReLU p-annealing: p goes linearly 1 -> p_end; None turns it off")
    anneal_start: float = _opt(0.5, "fraction of the steps where p-annealing starts")
    anneal_every: int = _opt(100, "steps between updates of p (and of the rescaled coefficient)")
    seed: int = _opt(0, "random seed (initialisation, data order)")
    log_every: int = _opt(50, "steps between log records")
    eval_every: int = _opt(0, "steps between evaluations; 0: at the end only")
    eval_tokens: int = _opt(8192, "tokens in the evaluation set")
    checkpoint_every: int = _opt(500, "steps between checkpoints (with out_dir); 0: none")
    keep_checkpoints: int = _opt(2, "checkpoints kept")
    out_dir: str | None = _opt(None, "folder for log.jsonl, checkpoints/ and the exported SAE; None: write nothing")
    log: str = _opt("jsonl", "run logs under out_dir, comma-separated: jsonl, tensorboard, wandb (sae.runlog)")
    export_format: str = _opt("saelens", "layout of the exported SAE: saelens, or sparsify (TopK, d_out == d_in)")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.init_b_dec not in ("geometric_median", "mean", "zero"):
            raise ValueError(f"init_b_dec must be 'geometric_median', 'mean' or 'zero', got {self.init_b_dec!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.betas = tuple(self.betas)
        runlog.parse_kinds(self.log)
        if self.export_format not in ("saelens", "sparsify"):
            raise ValueError(f"export_format must be 'saelens' or 'sparsify', got {self.export_format!r}")


def _numeric_attrs(model) -> dict:
    """The model's public int / float attributes (k, coefficients, p, thresholds kept as floats)."""
    attrs = vars(model).items()
    return {k: v for k, v in attrs if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


@torch.no_grad()
def _sync_state(src, dst) -> None:
    """Copy buffers and numeric attributes from one copy of a model to another (bf16 compute copy)."""
    for b_src, b_dst in zip(src.buffers(), dst.buffers()):
        b_dst.copy_(b_src)
    for k, v in _numeric_attrs(src).items():
        setattr(dst, k, v)


def compute_precision(precision: str, model: torch.nn.Module) -> str:
    """The step's compute precision: "auto" is bf16 (fp32 master weights and Adam) for an fp32 model on CUDA,
    so the kernels run their wgmma bf16 path rather than the IEEE fp32 dot (an FMA loop); fp32 otherwise."""
    if precision != "auto":
        return precision
    param = next(model.parameters())
    return "bf16" if param.is_cuda and param.dtype == torch.float32 else "fp32"


class Trainer:
    """Trains an SAE model (any class of `sae`) on an activation Source.

    eval_data: [N, d_in] raw activations ([N, d_in + d_out] pairs for a transcoder) for periodic evaluation
    (default: a sample of the source);
    eval_fn: extra metrics, called with the model (in eval mode); callbacks: called as cb(trainer, parts)
    after every step, parts the step's loss dict (tensors, plus "grad_norm" when clipping).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        source: Source,
        config: TrainConfig | None = None,
        *,
        eval_data: torch.Tensor | None = None,
        eval_fn: Callable[[torch.nn.Module], dict] | None = None,
        callbacks: list[Callable] = (),
    ):
        self.cfg = cfg = config or TrainConfig()
        if source.d_in != model.d_in:
            raise ValueError(f"source d_in={source.d_in} does not match model d_in={model.d_in}")
        if (source.d_out or source.d_in) != model.d_out:  # a transcoder trains on (input, target) pairs
            got = f"targets of d_out={source.d_out}" if source.d_out else "no targets"
            raise ValueError(f"the source has {got}, but the model has d_out={model.d_out} (d_in={model.d_in})")
        self.precision = compute_precision(cfg.precision, model)
        if next(model.parameters()).dtype != torch.float32 and self.precision == "bf16":
            raise ValueError("precision='bf16' needs fp32 master weights: build the model in float32")
        self.model, self.source = model, source
        self.eval_fn, self.callbacks = eval_fn, list(callbacks)
        self.device = next(model.parameters()).device
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        fused = self.device.type == "cuda" or None  # the fused CUDA Adam (fp32, fp16 and bf16 parameters)
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=fused)
        # bf16: the loss runs on a bf16 copy; its gradients land on the fp32 master weights.
        self.work = copy.deepcopy(model).to(torch.bfloat16) if self.precision == "bf16" else model
        for buf in self.work.buffers() if self.work is not model else ():
            if buf.is_floating_point():  # running statistics (BatchTopK's threshold EMA) stay fp32
                buf.data = buf.data.float()
        self.coeff_base = {c: float(getattr(model, c)) for c in SPARSITY_COEFFS if hasattr(model, c)}
        self.anneal = cfg.p_end is not None and hasattr(model, "p") and hasattr(model, "penalty")
        self._eval_raw = eval_data
        self.step, self.tokens = 0, 0
        run_tokens = cfg.steps * source.batch_size
        self.dead_tokens = cfg.dead_tokens if cfg.dead_tokens is not None else min(10_000_000, run_tokens // 4)
        self.since_fired = torch.zeros(model.d_sae, dtype=torch.long, device=self.device)
        self.p_acc = [0.0, 0.0, 0]  # p-annealing: sum of L_p at the current p, at the next p, count
        self.history: list[dict] = []
        self._log = None

    # Schedules ---------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
        decay_start = cfg.steps * (1 - cfg.lr_decay_frac)
        decay = 1.0 if step < decay_start else max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
        return cfg.lr * warm * decay

    def sparsity_factor(self, step: int) -> float:
        warm = self.cfg.sparsity_warmup_steps
        warm = max(1, self.cfg.steps // 20) if warm is None else warm
        return min(1.0, (step + 1) / warm) if warm > 0 else 1.0

    def p_at(self, step: int) -> float:
        """p-annealing: p from 1 to p_end between anneal_start and the end, moved every anneal_every steps."""
        cfg = self.cfg
        start = int(cfg.anneal_start * cfg.steps)
        if step <= start:
            return 1.0
        q = start + (step - start) // cfg.anneal_every * cfg.anneal_every
        return 1.0 + (cfg.p_end - 1.0) * min(1.0, (q - start) / max(1, cfg.steps - start))

    def _set_schedules(self) -> None:
        step, model = self.step, self.model
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        if self.anneal:
            p = self.p_at(step)
            if p != model.p:
                # Continuity: rescale the coefficient by recent mean L_p(current p) / L_p(new p).
                cur, nxt, count = self.p_acc
                if count and nxt > 0:
                    for c in self.coeff_base:
                        self.coeff_base[c] *= cur / nxt
                model.p, self.p_acc = p, [0.0, 0.0, 0]
        for c, base in self.coeff_base.items():
            setattr(model, c, base * self.sparsity_factor(step))

    # Setup -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_from_data(self) -> None:
        """act_scale and b_dec from a sample of the source (in the model's normalised space)."""
        cfg, model = self.cfg, self.model
        sample, target = self._split(self.source.sample(cfg.stats_tokens).to(self.device, model.dtype))
        if cfg.normalize:
            model.act_scale = 1.0
            xn = model.normalize(sample).float()
            model.act_scale = math.sqrt(model.d_in) / xn.norm(dim=1).mean().clamp_min(1e-12).item()
        xn, state = model._normalize(model._rows(sample))
        if target is not None:  # b_dec is the target's offset, in the input's normalised space
            xn = model._normalize_like(model._rows(target, "d_out", "target"), state)
        xn = xn.float()
        if cfg.init_b_dec != "zero":
            center = metrics.geometric_median(xn) if cfg.init_b_dec == "geometric_median" else xn.mean(0)
            model.b_dec.copy_(center.to(model.b_dec.dtype))

    # One step ----------------------------------------------------------------------------------------

    def _split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A source's rows -> (inputs, targets or None)."""
        return split_pairs(rows, self.model.d_in, self.source.d_out)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step on inputs x [B, d_in] (and targets y [B, d_out] for a transcoder)."""
        model, work, cfg = self.model, self.work, self.cfg
        self._set_schedules()
        model.train()
        work.train()
        if work is not model:
            with torch.no_grad():
                for w, m in zip(work.parameters(), model.parameters()):
                    w.copy_(m)
            _sync_state(model, work)
            x, y = x.to(torch.bfloat16), None if y is None else y.to(torch.bfloat16)
        parts = work.loss(x, target=y, dead_mask=self.since_fired >= self.dead_tokens)
        code = parts.pop("code")
        parts["loss"].backward()
        if work is not model:
            for w, m in zip(work.parameters(), model.parameters()):
                m.grad = None if w.grad is None else w.grad.float()
                w.grad = None
            _sync_state(work, model)
        self._sync_grads()
        W = model.W_dec
        if cfg.unit_norm_decoder and W.grad is not None:
            with torch.no_grad():  # keep only the gradient tangent to the unit sphere of each row
                Wf = W.float()
                g = W.grad.float()
                W.grad.copy_(g - (g * Wf).sum(1, keepdim=True) * Wf)
        if cfg.grad_clip > 0:
            parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cfg.unit_norm_decoder:
            with torch.no_grad():
                W.div_(W.float().norm(dim=1, keepdim=True).clamp_min(1e-12).to(W.dtype))
        with torch.no_grad():
            tokens = self._count_firing(code, x.shape[0])
            if self.anneal and self.step + cfg.anneal_every >= int(cfg.anneal_start * cfg.steps):
                nxt = self.p_at(self.step + cfg.anneal_every)
                self.p_acc[0] += self._penalty(code, model.p)
                self.p_acc[1] += self._penalty(code, nxt)
                self.p_acc[2] += 1
        self.step += 1
        self.tokens += tokens
        return parts

    # What a data-parallel trainer (sae.distributed) does differently within a step

    def _sync_grads(self) -> None:
        """Make the gradients the whole step's (one process: they are)."""

    def _count_firing(self, code, rows: int) -> int:
        """Update tokens-since-fired from the step's code (rows tokens); returns the tokens the step trained on."""
        self.since_fired += rows
        self.since_fired[code.indices[code.values != 0].long()] = 0
        return rows

    def _penalty(self, code, p: float) -> float:
        """The step's L_p penalty at p (p-annealing's continuity)."""
        return float(self.work.penalty(code, p))

    # Evaluation, export ------------------------------------------------------------------------------

    def eval_data(self) -> torch.Tensor:
        if self._eval_raw is None:
            self._eval_raw = self.source.sample(self.cfg.eval_tokens)
        return self._eval_raw

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics on the evaluation set (raw activations; FVU and L0 do not depend on act_scale)."""
        model = self.model.eval()
        x, y = self._split(self.eval_data().to(self.device, model.dtype))
        out = metrics.evaluate(model, x, target=y)
        out["dead_fraction_train"] = self.dead_fraction()
        out["c_dec"] = metrics.c_dec(self._decoder_rows(metrics.c_dec_latents(model.d_sae, C_DEC_LATENTS)))
        if self.eval_fn is not None:
            out.update(self.eval_fn(model))
        return out

    def _decoder_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W_dec[ids] [len(ids), d_out]."""
        return self.model.W_dec.detach()[ids.to(self.device)]

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for dead_tokens tokens (or since the start, when fewer)."""
        horizon = min(self.dead_tokens, self.tokens)
        return (self.since_fired >= max(horizon, 1)).float().mean().item()

    # State -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "model_attrs": _numeric_attrs(self.model),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "since_fired": self.since_fired,
            "coeff_base": dict(self.coeff_base),
            "p_acc": list(self.p_acc),
            "source": self.source.state_dict(),
            "rng": rng,
            "config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for k, v in state["model_attrs"].items():
            setattr(self.model, k, v)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.since_fired.copy_(state["since_fired"])
        self.coeff_base, self.p_acc = dict(state["coeff_base"]), list(state["p_acc"])
        self.source.load_state_dict(state["source"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())  # map_location may have moved it
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])

    def save_checkpoint(self) -> Path:
        if self.out_dir is None:
            raise ValueError("checkpoints need config.out_dir")
        return save_checkpoint(
            self.state_dict(), self.out_dir / "checkpoints", self.step, keep=self.cfg.keep_checkpoints
        )

    def resume(self) -> bool:
        """Load the latest checkpoint under out_dir/checkpoints; False when there is none."""
        path = latest_checkpoint(self.out_dir / "checkpoints") if self.out_dir else None
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        return True

    # Loop --------------------------------------------------------------------------------------------

    def _write(self, record: dict) -> None:
        self.history.append(record)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if self.out_dir is not None and rank0:
            if self._log is None:
                config = dataclasses.asdict(self.cfg) | {"model": self.model.config()}
                self._log = runlog.RunLog(self.cfg.log, self.out_dir, d_sae=self.model.d_sae, config=config)
            self._log.write(record)

    def _progress(self, rec: dict) -> None:
        if not self.cfg.progress:
            return
        n = self.cfg.steps
        filled = int(20 * rec["step"] / n)
        line = (
            f"[{'#' * filled}{'.' * (20 - filled)}] {rec['step']}/{n} {rec['tokens_per_s'] / 1e3:.1f}k tok/s "
            f"loss {rec['loss']:.4g} L0 {rec['l0']:.1f} FVU {rec['fvu']:.4f} dead {100 * rec['dead_fraction']:.1f}%"
        )
        end = "\r" if sys.stderr.isatty() and rec["step"] < n else "\n"
        print(line, end=end, file=sys.stderr, flush=True)

    def fit(self, *, resume: bool = False) -> dict:
        """Train to config.steps (continuing from the latest checkpoint with resume=True); returns a summary:
        steps, tokens, seconds, tokens_per_s, act_scale, the final evaluation and the export path (if out_dir)."""
        cfg = self.cfg
        if not (resume and self.resume()):
            torch.manual_seed(cfg.seed)
            self._init_from_data()
        start, start_tokens = time.perf_counter(), self.tokens
        t_log, tok_log = start, self.tokens
        while self.step < cfg.steps:
            batch = self.source.next_batch().to(self.device, torch.float32, non_blocking=True)
            parts = self._train_step(*self._split(batch))
            for cb in self.callbacks:
                cb(self, parts)
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                rec = {"step": self.step, "tokens": self.tokens, "lr": self.lr_at(self.step - 1)}
                rec.update({k: float(v.detach()) for k, v in parts.items() if torch.is_tensor(v) and v.numel() == 1})
                rec["dead_fraction"] = self.dead_fraction()
                rec["tokens_per_s"] = (self.tokens - tok_log) / max(now - t_log, 1e-9)
                rec.update({c: getattr(self.model, c) for c in (*self.coeff_base, "p") if hasattr(self.model, c)})
                t_log, tok_log = now, self.tokens
                self._write(rec)
                self._progress(rec)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                self._write({"step": self.step, "eval": self.evaluate()})
            if cfg.checkpoint_every and self.out_dir and (self.step % cfg.checkpoint_every == 0 or last):
                self.save_checkpoint()
        seconds = time.perf_counter() - start
        final = self.evaluate()
        self._write({"step": self.step, "eval": final})
        summary = {
            "steps": self.step,
            "tokens": self.tokens,
            "seconds": seconds,
            "tokens_per_s": (self.tokens - start_tokens) / max(seconds, 1e-9),
            "act_scale": self.model.act_scale,
            "eval": final,
        }
        if self.out_dir is not None:
            summary["export"] = str(self.save_export(self.out_dir / "sae"))
        if self._log is not None:
            self._log.close()
            self._log = None
        return summary

    def save_export(self, path: str | Path) -> Path:
        """Save the model (`sae.save`, in config.export_format's layout) with act_scale folded into its
        weights, so that every reader sees an SAE of raw activations."""
        path = Path(path)
        model = copy.deepcopy(self.model)
        model.fold_act_scale()
        save(model, path, format=self.cfg.export_format)
        return path
