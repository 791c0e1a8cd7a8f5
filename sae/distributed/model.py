"""A latent-sharded SAE: the architecture's own class, its per-latent tensors split over the shard group.

`shard_model(cls, d_in, d_sae, mesh, ...)` makes an instance of a subclass of `cls` (its config, attributes and
schedules are the class's own) whose per-latent tensors (W_enc, W_dec, b_enc, thresholds, gates, per-latent
buffers) are DTensors placed Shard(0) over the mesh's "shard" dimension, and b_dec, W_skip replicated; every rank
builds only its own rows (sae.base.latent_rows). Its loss, run, encode and decode are exact, the same as one
process with the same weights, and exchange, per step, within the shard group:

    TopK        local fused top-k -> all_gather of the [B, k] candidates (values, global ids) -> the global top-k
                per row (ties to the lower id), each shard keeping the winners it owns
    BatchTopK   local batch top-(B k) -> all_gather of those entries -> the global cut over batch and shards
    threshold   (ReLU, JumpReLU, gated, BatchTopK at inference) no exchange for the selection
    all         one all_reduce of the partial reconstructions [B, d_out] and the per-row sums the losses need
                (L0 counts, JumpReLU's l0, gated's gate reconstruction and L1, ReLU's penalty); backward: one
                all_reduce of b_dec's [d_in] gradient from the encoders' centring
    prefix      (Matryoshka, ordered) an exclusive scan (all_gather) of the partial reconstructions instead,
                forward and backward, since the prefix losses of shard s need the decodes of shards < s
    AuxK        one more candidate exchange over the dead latents, one more [B, d_out] sum

Weight gradients stay sparse and local to their shard.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import kernels
from kernels import SparseCode

from .. import metrics
from ..base import SAE, latent_rows
from ..prefix import MatryoshkaSAE, OrderedSAE
from ..threshold import GatedSAE, JumpReLUSAE, ReLUSAE
from ..topk import BatchTopKSAE, TopKSAE
from . import comm, select
from .mesh import DP, SHARD, shard_rows

LATENT_FREE = ("b_dec", "W_skip")  # the tensors without a latent dimension (replicated)


class ShardedSAE:
    """Mixin before an SAE class: this rank's latent rows, the exchanges, and the loss / run built from them.

    Families override `_shard_encode` (this shard's code), `_extra_parts` (per-row sums besides the
    reconstruction) and `_shard_losses` (the architecture's loss terms), as SAE classes do `_encode` and
    `_add_losses`.
    """

    _sae_class: type[SAE]
    _mesh: DeviceMesh
    _latents: range

    # Layout -------------------------------------------------------------------------------------------

    @property
    def latent_rows(self) -> range:
        """The latent ids this rank holds."""
        return self._latents

    @property
    def mesh(self) -> DeviceMesh:
        return self._mesh

    @property
    def _group(self):
        return self._mesh[SHARD].get_group()

    def _attach(self, mesh: DeviceMesh, rows: range) -> None:
        """Replace every tensor by a DTensor: this rank's rows of the per-latent ones, replicated for the others
        (scalar buffers stay plain tensors)."""
        self._mesh, self._latents = mesh, rows
        sharded, replicated = [Replicate(), Shard(0)], [Replicate(), Replicate()]
        for name, t in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]:
            if t.dim() == 0:
                continue
            if name in LATENT_FREE:
                local, placements = t.detach(), replicated
            elif name in ("W_enc", "W_dec"):  # built with this rank's rows only
                local, placements = t.detach(), sharded
            elif t.shape[0] == self.d_sae:
                local, placements = t.detach()[rows.start : rows.stop].clone(), sharded
            else:
                raise ValueError(f"{type(self).__name__}.{name} {tuple(t.shape)}: no latent dimension to shard")
            d = DTensor.from_local(local, mesh, placements, run_check=False)
            setattr(self, name, nn.Parameter(d, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else d)

    def _tensors(self) -> dict[str, torch.Tensor]:
        """{name: this rank's part} of every parameter and buffer (differentiable views of the DTensors)."""
        items = [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]
        return {name: t.to_local() if isinstance(t, DTensor) else t for name, t in items}

    def _centred(self, xn: torch.Tensor, t: dict) -> torch.Tensor:
        """The encoders' input x - b_dec (or x), whose gradient sums the shards' parts."""
        g = self._group
        x = comm.to_shards(xn, g)
        return x - comm.to_shards(t["b_dec"], g) if self.apply_b_dec_to_input else x

    def _own(self, code: SparseCode) -> SparseCode:
        """The entries of a global code [B, K] in this rank's rows, as a code of local ids (others empty)."""
        ids = code.indices.long() - self._latents.start
        mine = (ids >= 0) & (ids < len(self._latents))
        return SparseCode(torch.where(mine, code.values, 0), torch.where(mine, ids, 0).to(torch.int32))

    # Exchanges ----------------------------------------------------------------------------------------

    def _topk(self, xc, W, b, k: int, width: int, rows: torch.Tensor | None = None):
        """Exact TopK_k(ReLU(xc W^T + b)) over every shard's latents, from this shard's rows W [m, d] (local ids
        `rows` [m], default 0..m-1) and `width` >= min(k, m) candidates per shard (equal on every rank).

        Returns (this shard's code [B, width]: local ids, its winning values, 0 elsewhere; the global code [B, k]
        with global ids, detached, as one process gives it).
        """
        B, m = xc.shape[0], W.shape[0]
        kc = min(k, m)
        values, ids = xc.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.long, device=xc.device)
        if kc:
            local = kernels.topk_encode(xc, W, b, kc)
            values, ids = local.values, local.indices.long()
            ids = ids if rows is None else rows[ids]
        pad = width - kc
        values = torch.cat([values, values.new_full((B, pad), -1.0)], 1)  # padding never wins
        ids = torch.cat([ids, ids.new_zeros(B, pad)], 1)
        V, I = comm.gather(values, (ids + self._latents.start).to(torch.int32), group=self._group)  # [S, B, width]
        S = V.shape[0]
        V, I = V.permute(1, 0, 2).reshape(B, S * width), I.permute(1, 0, 2).reshape(B, S * width).long()
        win = select.topk_winners(V, I, k)
        s = self._mesh[SHARD].get_local_rank()
        mine = torch.zeros_like(V, dtype=torch.bool).scatter_(1, win, True).view(B, S, width)[:, s]
        code = SparseCode(torch.where(mine, values, 0), ids.to(torch.int32))
        return code, SparseCode(V.gather(1, win), I.gather(1, win).to(torch.int32))

    def _gather_code(self, code: SparseCode) -> SparseCode:
        """The global code of a shard's code: every shard's active entries with global ids, active slots first
        (by shard, then slot), as wide as the busiest row. No gradient."""
        g, B = self._group, code.values.shape[0]
        width = torch.tensor(code.k, device=code.values.device)
        comm.all_reduce(width, g, op=dist.ReduceOp.MAX)
        pad = int(width) - code.k
        values = torch.cat([code.values.detach(), code.values.new_zeros(B, pad)], 1)
        ids = torch.cat([code.indices.long() + self._latents.start, code.indices.new_zeros(B, pad).long()], 1)
        V, I = comm.gather(values, ids.to(torch.int32), group=g)
        V, I = V.permute(1, 0, 2).reshape(B, -1), I.permute(1, 0, 2).reshape(B, -1)
        active = V != 0
        order = (~active).to(torch.uint8).argsort(dim=1, stable=True)[:, : max(int(active.sum(1).max()), 1)]
        V, I = V.gather(1, order), I.gather(1, order)
        return SparseCode(V, torch.where(V != 0, I, 0))

    # Family hooks -------------------------------------------------------------------------------------

    def _shard_encode(self, xc: torch.Tensor, t: dict) -> tuple[SparseCode, object]:
        """(this shard's code of the centred rows xc [B, d_in], with local ids; what else the family needs)."""
        raise NotImplementedError

    def _global_code(self, code: SparseCode, info) -> SparseCode:
        return self._gather_code(code)

    def _decode_part(self, code: SparseCode, t: dict) -> torch.Tensor:
        """This shard's part of the reconstruction [B, d_out] (no bias)."""
        return kernels.sparse_decode(code, t["W_dec"], None)

    def _extra_parts(self, code: SparseCode, info, t: dict) -> dict[str, torch.Tensor]:
        """Per-shard parts of the sums the loss terms need (summed with the reconstruction)."""
        return {}

    def _sum_parts(self, code: SparseCode, info, t: dict) -> dict[str, torch.Tensor]:
        """{"decode": the reconstruction without bias, "count": active latents per row, ...extra}: shard sums."""
        parts = {"decode": self._decode_part(code, t), "count": (code.values != 0).sum(-1).float()}
        parts |= self._extra_parts(code, info, t)
        return dict(zip(parts, comm.from_shards(*parts.values(), group=self._group)))

    def _shard_losses(self, parts: dict, **ctx) -> None:
        """Add the architecture's terms to parts (as the class's _add_losses)."""

    # The model's API ----------------------------------------------------------------------------------

    def _forward_parts(self, x: torch.Tensor):
        xn, state = self._normalize(self._rows(x))
        t = self._tensors()
        xc = self._centred(xn, t)
        code, info = self._shard_encode(xc, t)
        skip = None if t.get("W_skip") is None else xn @ t["W_skip"].T
        return xn, state, t, xc, code, info, skip

    def loss(
        self, x: torch.Tensor, *, dead_mask: torch.Tensor | None = None, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """As SAE.loss, the same values and gradients as one process; every rank of a data group passes the same
        x (its group's batch). dead_mask: [d_sae] or this rank's [len(latent_rows)] rows. "code" is this
        shard's code (local ids), for firing statistics."""
        xn, state, t, xc, code, info, skip = self._forward_parts(x)
        y = self._target(target, xn, state)
        sums = self._sum_parts(code, info, t)
        y_hat = sums["decode"] + t["b_dec"]
        y_hat = y_hat if skip is None else y_hat + skip
        mse = metrics.mse(y, y_hat)
        parts = {"loss": mse, "mse": mse, "fvu": metrics.fvu(y, y_hat), "l0": sums["count"].mean()}
        if dead_mask is not None:
            dead_mask = self._local_mask(dead_mask)
        ctx = {"xn": xn, "xc": xc, "y": y, "y_hat": y_hat, "skip": skip, "code": code, "sums": sums, "t": t}
        self._shard_losses(parts, dead_mask=dead_mask, **ctx)
        parts["code"] = SparseCode(code.values.detach(), code.indices)
        return parts

    def _local_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.shape not in ((self.d_sae,), (len(self._latents),)):
            raise ValueError(f"dead_mask must be a [d_sae={self.d_sae}] or [{len(self._latents)}] (this rank's) tensor")
        return mask[self._latents.start : self._latents.stop] if mask.shape[0] != len(self._latents) else mask

    def run(self, x: torch.Tensor, *, edit=None) -> tuple[SparseCode, torch.Tensor]:
        """As SAE.run: (the global code [B, K] with global ids, x_hat). `edit` changes the global code before
        it is decoded; gradients reach the encoder only without `edit`."""
        xn, state, t, xc, code, info, skip = self._forward_parts(x)
        global_code = self._global_code(code, info)
        if edit is not None:
            global_code = edit(global_code)
            code = self._own(global_code)
        (part,) = comm.from_shards(self._decode_part(code, t), group=self._group)
        out = part + t["b_dec"] if skip is None else part + t["b_dec"] + skip
        out = self._denormalize(out, state)
        return global_code, out.reshape(self._shape_out(x)).to(x.dtype)

    def _encode(self, xn: torch.Tensor) -> SparseCode:
        t = self._tensors()
        code, info = self._shard_encode(self._centred(xn, t), t)
        return self._global_code(code, info)

    def decode(self, code: SparseCode) -> torch.Tensor:
        """A global code [B, K] -> [B, d_out] (normalised space, no skip): each shard decodes the entries it owns."""
        t = self._tensors()
        (part,) = comm.from_shards(self._decode_part(self._own(code), t), group=self._group)
        return part + t["b_dec"]


class _ShardedTopK(ShardedSAE):
    def _tensors(self):
        t = super()._tensors()  # the decoder-norm rescaling, with the class's own math, on this shard's rows
        view = SimpleNamespace(**t, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        t["W_enc"], t["b_enc"], t["W_dec"] = TopKSAE._weights(view)
        return t

    def _shard_encode(self, xc, t):
        code, global_code = self._topk(xc, t["W_enc"], t["b_enc"], self.k, min(self.k, t["W_enc"].shape[0]))
        return code, global_code

    def _global_code(self, code, info):
        return info

    def _shard_losses(self, parts, *, xc, y, y_hat, dead_mask, t, **_):
        if dead_mask is None:
            return
        aux = self._aux_loss(xc, (y - y_hat).detach(), dead_mask, t)
        parts["aux"] = aux
        parts["loss"] = parts["loss"] + self.aux_coeff * aux

    def _aux_loss(self, xc, residual, dead_mask, t) -> torch.Tensor:
        """AuxK over every shard's dead latents (dead_mask: this shard's rows), as TopKSAE.aux_loss."""
        dead = dead_mask.to(xc.device).nonzero().squeeze(1)
        n_dead = torch.tensor(dead.numel(), device=xc.device)
        comm.all_reduce(n_dead, self._group)
        if int(n_dead) == 0:
            return residual.new_zeros((), dtype=torch.float32)
        k_aux = min(self.aux_k, int(n_dead))
        b = None if t["b_enc"] is None else t["b_enc"][dead]
        code, _ = self._topk(xc, t["W_enc"][dead], b, k_aux, k_aux, rows=dead)
        (e_hat,) = comm.from_shards(kernels.sparse_decode(code, t["W_dec"], None), group=self._group)
        return metrics.fvu(residual, e_hat)


class _ShardedBatchTopK(_ShardedTopK):
    def _shard_encode(self, xc, t):
        W, b = t["W_enc"], t["b_enc"]
        if self.training or float(self.threshold) < 0:
            return self._batch_topk(xc, W, b), None
        return kernels.batch_topk_inference(xc, W, b, float(self.threshold)), None

    def _global_code(self, code, info):
        return self._gather_code(code)

    def _batch_topk(self, xc, W, b) -> SparseCode:
        """The B k largest entries of ReLU(xc W^T + b) over the batch and every shard's latents (ties: lower row,
        then lower global id), from this shard's own batch top-k; updates the threshold EMA in training."""
        B, n = xc.shape[0], self.d_sae
        local = kernels.batch_topk_encode(xc, W, b, min(self.k, W.shape[0]))
        values = local.values.detach()
        rows = torch.arange(B, device=xc.device)[:, None]
        keys = rows * n + (local.indices.long() + self._latents.start)
        mine = values > 0
        room = B * min(self.k, W.shape[0])  # the most entries a shard keeps
        cand_v = values.new_full((room,), -1.0)
        cand_k = keys.new_zeros(room)
        count = int(mine.sum())
        cand_v[:count], cand_k[:count] = values[mine], keys[mine]
        V, K = comm.gather(cand_v, cand_k, group=self._group)
        cut = select.batch_topk_cut(V.reshape(-1), K.reshape(-1), B * self.k)
        if self.training:
            low = cut[0] if cut is not None else torch.where(V > 0, V, float("inf")).min()
            self._update_threshold(self._data_mean(low.float()).reshape(1))
        return SparseCode(torch.where(select.kept(values, keys, cut), local.values, 0), local.indices)

    def _data_mean(self, low: torch.Tensor) -> torch.Tensor:
        """The mean over the data groups of each group's smallest kept value (inf where a group kept none)."""
        dp = self._mesh[DP]
        if dp.size() == 1:
            return low
        finite = torch.isfinite(low)
        acc = torch.stack([torch.where(finite, low, 0.0), finite.float()])
        comm.all_reduce(acc, dp.get_group())
        return acc[0] / acc[1] if acc[1] > 0 else low.new_tensor(float("inf"))


class _ShardedPrefix(_ShardedBatchTopK):
    def _sum_parts(self, code, info, t):
        below, total = comm.exclusive_scan(self._decode_part(code, t), self._group)
        (count,) = comm.from_shards((code.values != 0).sum(-1).float(), group=self._group)
        return {"decode": total, "below": below, "count": count}

    def _shard_losses(self, parts, *, y, skip, code, sums, t, **ctx):
        target = y if skip is None else y - skip
        if isinstance(self, OrderedSAE):  # per-latent weights: this shard's rows
            weights = t["prefix_weights"]
        else:
            weights = self._size_weights()[self._latents.start : self._latents.stop]
        r = comm.to_shards(target - t["b_dec"], self._group) - sums["below"]
        local = kernels.prefix_losses(code, t["W_dec"], None, r.to(self.dtype), weights.to(r.device))
        (total,) = comm.from_shards(local, group=self._group)
        prefix = total.mean()
        parts["prefix"] = prefix
        parts["loss"] = prefix
        super()._shard_losses(parts, y=y, code=code, sums=sums, t=t, **ctx)


class _ShardedReLU(ShardedSAE):
    def _shard_encode(self, xc, t):
        return kernels.relu_encode(xc, t["W_enc"], t["b_enc"]), None

    def _decode_part(self, code, t):
        W = t["W_dec"]
        if code.k != W.shape[0]:
            return super()._decode_part(code, t)
        return code.to_dense(W.shape[0]).to(W.dtype) @ W  # the dense layout (every latent a slot): one matmul

    def _extra_parts(self, code, info, t):
        return {"penalty": ReLUSAE.penalty(SimpleNamespace(W_dec=t["W_dec"]), code, self.p)}

    def _shard_losses(self, parts, *, sums, **_):
        parts["penalty"] = sums["penalty"]
        parts["loss"] = parts["loss"] + self.l1_coeff * sums["penalty"]

    def penalty(self, code: SparseCode, p: float) -> torch.Tensor:
        """ReLUSAE.penalty of this shard's code (local ids), summed over the shards."""
        part = ReLUSAE.penalty(SimpleNamespace(W_dec=self._tensors()["W_dec"]), code, p)
        return comm.from_shards(part, group=self._group)[0]


class _ShardedJumpReLU(ShardedSAE):
    def _shard_encode(self, xc, t):
        code = kernels.jumprelu_encode(xc, t["W_enc"], t["b_enc"], t["threshold"], bandwidth=self.bandwidth)
        return code, None

    def _extra_parts(self, code, info, t):
        return {"l0": code.l0}

    def _shard_losses(self, parts, *, sums, **_):
        l0 = sums["l0"].mean()
        parts["l0"] = l0
        parts["loss"] = parts["loss"] + self.l0_coeff * l0


class _ShardedGated(ShardedSAE):
    def _shard_encode(self, xc, t):
        return kernels.gated_encode(xc, t["W_enc"], t["b_gate"], t["r_mag"], t["b_mag"]), None

    def _extra_parts(self, code, info, t):
        gate = SparseCode(code.gate, code.indices)
        return {"gate": kernels.sparse_decode(gate, t["W_dec"].detach(), None), "l1": code.gate.float().sum(-1)}

    def _shard_losses(self, parts, *, xn, y, sums, t, **_):
        recon = sums["gate"] + t["b_dec"].detach()
        if t.get("W_skip") is not None:
            recon = recon + xn @ t["W_skip"].detach().T
        l1 = sums["l1"].mean()
        aux = (recon.float() - y.float()).pow(2).sum(-1).mean()
        parts["l1"], parts["aux"] = l1, aux
        parts["loss"] = parts["loss"] + self.l1_coeff * l1 + aux


FAMILIES = (  # most specific first
    ((MatryoshkaSAE, OrderedSAE), _ShardedPrefix),
    ((BatchTopKSAE,), _ShardedBatchTopK),
    ((TopKSAE,), _ShardedTopK),
    ((JumpReLUSAE,), _ShardedJumpReLU),
    ((GatedSAE,), _ShardedGated),
    ((ReLUSAE,), _ShardedReLU),
)


@functools.cache
def sharded_class(cls: type[SAE]) -> type:
    """The sharded subclass of an SAE class (one per class)."""
    for bases, family in FAMILIES:
        if issubclass(cls, bases):
            return type(f"Sharded{cls.__name__}", (family, cls), {"_sae_class": cls})
    raise TypeError(f"{cls.__name__}: no sharded form (known: {', '.join(c.__name__ for b, _ in FAMILIES for c in b)})")


def shard_model(cls: type[SAE], d_in: int, d_sae: int, mesh: DeviceMesh, **kw) -> SAE:
    """cls(d_in, d_sae, **kw) split over mesh's "shard" dimension: this rank builds and holds only its rows
    (d_sae / S of them), with the values one process builds from the same global seed (torch.manual_seed
    before both)."""
    rows = shard_rows(mesh, d_sae)
    with latent_rows(rows):
        model = sharded_class(cls)(d_in, d_sae, **kw)
    model._attach(mesh, rows)
    return model


def gather_model(model: ShardedSAE) -> SAE | None:
    """The whole model as its plain class on CPU, on global rank 0 (None on the other ranks); a collective of
    the first data group. Rank 0 receives one shard's rows at a time, so no device holds more than its own."""
    mesh = model.mesh
    if mesh[DP].get_local_rank() != 0:
        return None
    group, s = mesh[SHARD].get_group(), mesh[SHARD].get_local_rank()
    tensors = {}
    for name, t in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]:
        if not isinstance(t, DTensor) or not isinstance(t.placements[1], Shard):
            tensors[name] = (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().clone()
            continue
        local = t.to_local().detach().contiguous()
        if s:
            dist.send(local, dst=dist.get_global_rank(group, 0), group=group)
            continue
        full, m, buf = torch.empty(t.shape, dtype=t.dtype), local.shape[0], torch.empty_like(local)
        full[:m] = local.cpu()
        for src in range(1, mesh[SHARD].size()):
            dist.recv(buf, src=dist.get_global_rank(group, src), group=group)
            full[src * m : (src + 1) * m] = buf.cpu()
        tensors[name] = full
    if s:
        return None
    out = model._sae_class(**model.config(), dtype=model.dtype, device="meta")
    out.load_state_dict(tensors, assign=True)
    return out.train(model.training)
