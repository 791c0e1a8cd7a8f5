"""Model fidelity: the language model's next-token loss with the SAE spliced in (`sae.attach`).

For token windows and a causal LM whose module's output the SAE reads, with CE the mean next-token cross-entropy:

    CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)

against zero ablation (the output replaced by zeros) and mean ablation (by its mean over the windows), and
KL = mean over positions of KL(p_clean || p_spliced) of the next-token distributions (Bricken et al., "Towards
Monosemanticity"; Gao et al., "Scaling and evaluating sparse autoencoders"; SAELens's evaluations).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..harvest import Harvester
from ..hooks import attach
from .stream import Progress, batches, inference


def resolve_module(lm: torch.nn.Module, name: str) -> str:
    """`name` as a module of lm, or of its base model (a harvest hooks "h.3" of GPT2Model; the causal LM
    calls it "transformer.h.3"). ValueError naming the closest modules otherwise."""
    prefix = getattr(lm, "base_model_prefix", "")
    for full in [name] + ([f"{prefix}.{name}"] if prefix else []):
        try:
            lm.get_submodule(full)
            return full
        except AttributeError:
            continue
    return Harvester(lm, name).module_name  # raises the ValueError that names the closest modules


@contextlib.contextmanager
def _replaced(module: torch.nn.Module, fn):
    """Within the block, module's output (its first element when a tuple) becomes fn(output)."""

    def hook(_m, _inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _log_probs(lm, ids: torch.Tensor) -> torch.Tensor:
    """ids [b, T] -> [b (T - 1), V] fp32 log-probabilities of the next token at positions 0 .. T - 2."""
    out = lm(ids)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.log_softmax(logits[:, :-1].flatten(0, 1).float(), -1)


@torch.no_grad()
def ce_loss_recovered(lm, module: str, model, tokens, *, batch_size: int = 8, progress: bool = False) -> dict:
    """CE loss recovered and KL of `lm` with `model` spliced into `module` (a dotted name, as in
    lm.named_modules(), or of lm's base model).

    lm: a causal LM (its forward returns logits [b, T, V], e.g. transformers' *ForCausalLM); tokens: [N, T] input
    ids, or an iterable of [b, T] batches (kept in memory: the mean activation is taken first). Returns ce_clean,
    ce_spliced, ce_zero, ce_mean, ce_recovered_zero, ce_recovered_mean, kl (spliced), kl_zero, kl_mean and tokens
    (the predicted positions).
    """
    name = resolve_module(lm, module)
    block = lm.get_submodule(name)
    device = next(lm.parameters()).device
    windows = list(batches(tokens, batch_size, "tokens"))
    if not windows or any(b.dim() != 2 or b.shape[1] < 2 for b in windows):
        raise ValueError("tokens must be [N, T] input ids (or [b, T] batches) with T >= 2")
    harvester = Harvester(lm, name, dtype=torch.float64)
    total, rows = None, 0
    for ids in windows:
        h = harvester(ids)
        total = h.sum(0) if total is None else total + h.sum(0)
        rows += h.shape[0]
    mean = total / rows
    fill = lambda o: mean.to(o.dtype).expand_as(o).contiguous()
    sums = dict.fromkeys(("clean", "spliced", "zero", "mean", "kl", "kl_zero", "kl_mean"), 0.0)
    count = 0
    bar = Progress("ce loss recovered", sum(b.shape[0] for b in windows)) if progress else None
    for ids in windows:
        ids = ids.to(device)
        target = ids[:, 1:].reshape(-1)
        lp = {"clean": _log_probs(lm, ids)}
        with inference(model), attach(block, model, replace=True, keep_codes=False):
            lp["spliced"] = _log_probs(lm, ids)
        with _replaced(block, torch.zeros_like):
            lp["zero"] = _log_probs(lm, ids)
        with _replaced(block, fill):
            lp["mean"] = _log_probs(lm, ids)
        p = lp["clean"].exp()
        for key, value in lp.items():
            sums[key] += F.nll_loss(value, target, reduction="sum").item()
        for key, other in (("kl", "spliced"), ("kl_zero", "zero"), ("kl_mean", "mean")):
            sums[key] += (p * (lp["clean"] - lp[other])).sum().item()
        count += target.numel()
        if bar is not None:
            bar.update(ids.shape[0])
    if bar is not None:
        bar.close()
    out = {f"ce_{k}" if not k.startswith("kl") else k: v / count for k, v in sums.items()}
    for ablation in ("zero", "mean"):
        gap = out[f"ce_{ablation}"] - out["ce_clean"]
        recovered = (out[f"ce_{ablation}"] - out["ce_spliced"]) / gap if gap != 0 else float("nan")
        out[f"ce_recovered_{ablation}"] = recovered
    out["tokens"] = count
    return out
