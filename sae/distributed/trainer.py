"""sae.Trainer on a data-parallel x latent-shard mesh: what changes when the model is a ShardedSAE.

    data         data group g of G trains on source.part(g, G): stored activations (ShardSource) give it rows
                 [g B / G, (g + 1) B / G) of each global batch, read alone, so the G groups train on exactly
                 the batches one process would; a running model (HarvestSource) runs on the group's own
                 documents; in-memory and synthetic sources make the whole batch and keep the group's rows.
                 The batch size must divide by G. Each group's data position goes into the checkpoints.
    gradients    a shard's weight gradients stay on its ranks; across the data groups they are averaged: each
                 large one (>= BUCKET_BYTES) is sent as soon as backward has accumulated it (overlapping the
                 rest of backward), the small ones in one bucket after; clipping sees the global norm (DTensors)
    statistics   tokens-since-fired per shard, merged over the data groups every step (n / S bytes); logged
                 losses averaged over the data groups; dead fraction and evaluation over all latents
    checkpoints  sae.distributed.checkpoint (DCP), resumable on another number of ranks and latent shards
    export       rank 0 gathers the model one shard at a time and writes it with sae.save
Logs and the progress bar come from rank 0. A failed collective (a rank died or timed out) ends the run with an
error naming the step and the checkpoint folder to resume from.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..data import Source
from ..formats import save
from ..trainer import TrainConfig, Trainer
from . import checkpoint, comm
from .mesh import DP, SHARD
from .model import ShardedSAE, gather_model

BUCKET_BYTES = 1 << 20  # gradients at least this large are averaged as soon as backward has them


def _lost_peer(e: BaseException) -> bool:
    return isinstance(e, dist.DistError) or "gloo" in str(e)


class DistributedTrainer(Trainer):
    """Trainer for a model made by sae.distributed.shard_model; `source` yields the global batches (as for one
    process: the same seed and batch size train the same model), and each data group trains on its part
    (Source.part). Every rank runs it."""

    def __init__(self, model: ShardedSAE, source: Source, config: TrainConfig | None = None, **kw):
        if not isinstance(model, ShardedSAE):
            raise TypeError(f"model must come from sae.distributed.shard_model, got {type(model).__name__}")
        mesh = model.mesh
        self.dp, self.dp_group, self.shard_group = mesh[DP].size(), mesh[DP].get_group(), mesh[SHARD].get_group()
        self.group = mesh[DP].get_local_rank()
        part = source.part(self.group, self.dp)
        super().__init__(model, source, config, **kw)
        self.source = part
        self.since_fired = torch.zeros(len(model.latent_rows), dtype=torch.long, device=self.device)
        self._pending, self._sent = [], set()
        if self.dp > 1 and self.work is model:  # bf16: the fp32 gradients exist only after backward
            for p in model.parameters():
                if p.to_local().numel() * p.element_size() >= BUCKET_BYTES:
                    p.register_post_accumulate_grad_hook(self._average_now)

    # Within a step -----------------------------------------------------------------------------------

    def _average_now(self, p: torch.Tensor) -> None:
        self._pending.append(comm.all_reduce(p.grad.to_local(), self.dp_group, async_op=True))
        self._sent.add(id(p))

    def _sync_grads(self) -> None:
        if self.dp == 1:
            return
        for work in self._pending:
            work.wait()
        grads = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None]
        rest = [p.grad.to_local() for p in self.model.parameters() if p.grad is not None and id(p) not in self._sent]
        if rest:
            flat = torch.cat([g.reshape(-1) for g in rest])
            comm.all_reduce(flat, self.dp_group)
            for g, f in zip(rest, flat.split([g.numel() for g in rest])):
                g.copy_(f.view_as(g))
        torch._foreach_div_(grads, self.dp)
        self._pending, self._sent = [], set()

    def _count_firing(self, code, rows: int) -> int:
        fired = torch.zeros(len(self.since_fired), dtype=torch.uint8, device=self.device)
        fired[code.indices[code.values != 0].long()] = 1
        if self.dp > 1:
            comm.all_reduce(fired, self.dp_group, op=dist.ReduceOp.MAX)
        self.since_fired += rows * self.dp
        self.since_fired[fired.bool()] = 0
        return rows * self.dp

    def _penalty(self, code, p: float) -> float:
        return self._data_mean(self.work.penalty(code, p).detach().float().reshape(1))[0].item()

    def _data_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the data groups of each group's values (a 1-D tensor)."""
        if self.dp > 1:
            values = values.clone()
            comm.all_reduce(values, self.dp_group)
            values /= self.dp
        return values

    def _train_step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        parts = super()._train_step(x, y)
        if isinstance(parts.get("grad_norm"), DTensor):
            parts["grad_norm"] = parts["grad_norm"].full_tensor()
        if self.dp > 1 and (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps):  # fit logs these
            names = [k for k, v in parts.items() if torch.is_tensor(v) and v.numel() == 1]
            mean = self._data_mean(torch.stack([parts[k].detach().float().reshape(()) for k in names]))
            parts.update(zip(names, mean))
        return parts

    # Setup, statistics, evaluation -------------------------------------------------------------------

    @torch.no_grad()
    def _init_from_data(self) -> None:
        """Trainer._init_from_data on every rank (the same sample), writing this rank's copy of b_dec; then rank 0's
        b_dec and act_scale go to every rank."""
        model, b_dec = self.model, self.model.b_dec
        model._parameters["b_dec"] = nn.Parameter(b_dec.to_local(), requires_grad=False)  # the same storage
        try:
            super()._init_from_data()
        finally:
            model._parameters["b_dec"] = b_dec
        b_dec = b_dec.to_local()
        scale = torch.tensor([model.act_scale], dtype=torch.float64, device=self.device)
        dist.broadcast(b_dec, src=0)
        dist.broadcast(scale, src=0)
        model.act_scale = scale.item()

    def dead_fraction(self) -> float:
        horizon = min(self.dead_tokens, self.tokens)
        dead = (self.since_fired >= max(horizon, 1)).sum()
        comm.all_reduce(dead, self.shard_group)
        return dead.item() / self.model.d_sae

    def _decoder_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W_dec[ids] [len(ids), d_out] on every rank (each shard fills its rows; one all_reduce)."""
        rows, W = self.model.latent_rows, self.model.W_dec.to_local().detach()
        out = W.new_zeros(len(ids), W.shape[1])
        ids = ids.to(W.device)
        mine = (ids >= rows.start) & (ids < rows.stop)
        out[mine] = W[ids[mine] - rows.start]
        comm.all_reduce(out, self.shard_group)
        return out

    def _progress(self, rec: dict) -> None:
        if dist.get_rank() == 0:
            super()._progress(rec)

    # State -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What DCP saves: model and optimizer state as DTensors (global shapes), since_fired sharded likewise,
        and the small state (step, schedules, data position, RNG) as bytes."""
        small = super().state_dict()
        for key in ("model", "optimizer", "since_fired"):
            del small[key]
        groups = [small["source"]] * self.dp  # every data group's position, the same list on every rank
        if self.dp > 1:
            dist.all_gather_object(groups, small["source"], group=self.dp_group)
        small["source"] = groups
        blob = io.BytesIO()
        torch.save(small, blob)
        model_state, optim_state = get_state_dict(self.model, self.opt)
        since = DTensor.from_local(self.since_fired, self.model.mesh, [Replicate(), Shard(0)], run_check=False)
        return {"model": model_state, "optimizer": optim_state, "since_fired": since, "trainer": blob.getvalue()}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        small = torch.load(io.BytesIO(state["trainer"]), weights_only=False)
        groups = small["source"]
        if len(groups) == self.dp:
            small["source"] = groups[self.group]
        elif all(g == groups[0] for g in groups):  # one stream position (stored activations): any layout
            small["source"] = groups[0]
        else:
            raise ValueError(
                f"the checkpoint holds a data position per data group for {len(groups)} groups (each read its own "
                f"documents); resume it with {len(groups)} data groups (ranks / latent shards), not {self.dp}"
            )
        self.since_fired.copy_(state["since_fired"].to_local())
        mine = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "since_fired": self.since_fired}
        super().load_state_dict(small | mine)

    def save_checkpoint(self) -> Path:
        if self.out_dir is None:
            raise ValueError("checkpoints need config.out_dir")
        folder = self.out_dir / "checkpoints"
        return checkpoint.save(self.state_dict(), folder, self.step, keep=self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Load the latest complete checkpoint under out_dir/checkpoints (rank 0's choice); False when none."""
        found = [checkpoint.latest(self.out_dir / "checkpoints") if self.out_dir else None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return False
        state = self.state_dict()
        checkpoint.load(state, found[0])
        self.load_state_dict(state)
        return True

    def save_export(self, path: str | Path) -> Path:
        """Rank 0 gathers the model and saves it (act_scale folded in) with sae.save; one process reads it."""
        path = Path(path)
        model = gather_model(self.model)
        if model is not None:
            model.fold_act_scale()
            save(model, path)
        dist.barrier()
        return path

    def fit(self, *, resume: bool = False) -> dict:
        try:
            return super().fit(resume=resume)
        except RuntimeError as e:
            if not _lost_peer(e):
                raise
            where = f"; resume from {self.out_dir / 'checkpoints'}" if self.out_dir else ""
            raise RuntimeError(
                f"rank {dist.get_rank()}: a collective failed at step {self.step + 1}: another rank died or timed "
                f"out, so the run stops{where} ({str(e).splitlines()[0]})"
            ) from e
