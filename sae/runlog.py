"""Run logs: the trainer's records written to log.jsonl, TensorBoard and Weights & Biases (any of them at once).

log.jsonl keeps each record as the trainer made it: {"step", "tokens", "lr", "loss", "mse", "fvu", "l0",
..., "dead_fraction", "tokens_per_s"} every log_every steps, and {"step", "eval": {...}} per evaluation.
TensorBoard and W&B get scalars, named as SAELens names them where the value means the same:

    record key      logged name                           value
    loss            losses/overall_loss                   the total loss that is backpropagated
    mse             losses/mse_loss                       mean over tokens of ||y - y_hat||^2 (normalised space)
    fvu             metrics/explained_variance            1 - fvu (SAELens: 1 - mean L2 error / mean variance)
                    metrics/fvu                           fvu
    l0              metrics/l0                            mean active latents per token
    dead_fraction   sparsity/dead_features                dead_fraction * d_sae (a count, as SAELens logs it)
                    sparsity/dead_fraction                dead_fraction
    lr              details/current_learning_rate
    tokens          details/n_training_tokens
    l1_coeff        details/l1_coefficient                (the scheduled value)
    l0_coeff        details/l0_coefficient
    penalty, l1, aux, prefix   losses/<key>               architecture loss terms, before their coefficients
    any other key   details/<key>                         (tokens_per_s, grad_norm, p, ...)
    eval: {k: v}    eval/<k>

W&B runs in the mode its environment sets (WANDB_MODE=offline needs no account or network; the run lands in
out_dir/wandb/) with the project from WANDB_PROJECT; TensorBoard event files go to out_dir/tensorboard/.
"""

from __future__ import annotations

import json
from pathlib import Path

KINDS = ("jsonl", "tensorboard", "wandb")
RENAMED = {
    "loss": "losses/overall_loss",
    "mse": "losses/mse_loss",
    "l0": "metrics/l0",
    "lr": "details/current_learning_rate",
    "tokens": "details/n_training_tokens",
    "l1_coeff": "details/l1_coefficient",
    "l0_coeff": "details/l0_coefficient",
    "fvu": "metrics/fvu",
    "dead_fraction": "sparsity/dead_fraction",
}
LOSS_TERMS = ("penalty", "l1", "aux", "prefix")


def parse_kinds(text: str) -> tuple[str, ...]:
    """ "jsonl,tensorboard" -> ("jsonl", "tensorboard"); ValueError naming an unknown kind."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"log: unknown run logs {bad}; choose from {', '.join(KINDS)} (comma-separated)")
    return kinds


def scalars(record: dict, d_sae: int) -> dict[str, float]:
    """The named scalars that TensorBoard and W&B get for one record (the module docstring has the map)."""
    if "eval" in record:
        return {f"eval/{k}": float(v) for k, v in record["eval"].items() if isinstance(v, (int, float))}
    out = {}
    for k, v in record.items():
        if k == "step" or not isinstance(v, (int, float)):
            continue
        name = RENAMED.get(k) or (f"losses/{k}" if k in LOSS_TERMS else f"details/{k}")
        out[name] = float(v)
    if "fvu" in record:
        out["metrics/explained_variance"] = 1.0 - float(record["fvu"])
    if "dead_fraction" in record:
        out["sparsity/dead_features"] = float(round(record["dead_fraction"] * d_sae))
    return out


class RunLog:
    """The chosen run logs of one run under out_dir. write(record) each record; close() at the end."""

    def __init__(self, kinds: str | tuple[str, ...], out_dir: str | Path, *, d_sae: int, config: dict | None = None):
        self.kinds = parse_kinds(kinds) if isinstance(kinds, str) else tuple(kinds)
        self.out_dir, self.d_sae = Path(out_dir), d_sae
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out_dir / "log.jsonl", "a", encoding="utf-8") if "jsonl" in self.kinds else None
        self._tb = self._wandb = None
        if "tensorboard" in self.kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log=tensorboard needs the tensorboard package: pip install tensorboard") from e
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        if "wandb" in self.kinds:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("log=wandb needs the wandb package: pip install wandb") from e
            self._wandb = wandb.init(dir=str(self.out_dir), name=self.out_dir.name, config=config)

    def write(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is None and self._wandb is None:
            return
        values = scalars(record, self.d_sae)
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, v, record["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._tb = self._wandb = None
