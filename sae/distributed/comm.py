"""The exchanges of a latent-sharded step: collectives with the gradients the math needs, and a count of bytes.

On the shard group (the ranks that share one batch and split the latents), the conjugate pair of tensor
parallelism:
  to_shards(t)       forward identity, backward all_reduce: a replicated tensor entering per-shard math (the
                     encoders' centred input), whose gradient is the sum of every shard's part;
  from_shards(*ts)   forward one all_reduce of all the tensors (summed in fp32 at least), backward identity: the
                     per-shard parts of a replicated result (partial reconstructions, L0 counts, penalties); every
                     rank computes the same loss from the sum, so each passes that gradient to its own part;
  exclusive_scan(t)  forward all_gather: (sum over the lower shards, sum over all); backward all_gather of the
                     gradients of the lower sums (prefix losses, where shard s needs the decodes of shards < s);
  gather(t)          all_gather without gradient, any dtype, stacked [S, ...] (top-k candidates, codes).

Every collective adds to TRAFFIC the bytes this rank sends under the ring algorithms NCCL and gloo run on large
buffers: all_gather (S - 1) m, all_reduce 2 (S - 1) m / S, for an m-byte contribution. Groups of one rank cost
nothing and send nothing.
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist


class Traffic:
    """Bytes this rank sent per kind of collective (ring model), and calls; `reset()` between measurements."""

    def __init__(self):
        self.sent: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def add(self, op: str, payload: int, ranks: int) -> None:
        if ranks > 1:
            ring = (ranks - 1) * payload if op == "all_gather" else 2 * (ranks - 1) * payload // ranks
            self.sent[op] += ring
            self.calls[op] += 1

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


TRAFFIC = Traffic()
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.12


def size(group) -> int:
    return dist.get_world_size(group)


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In-place all_reduce over group, counted."""
    TRAFFIC.add("all_reduce", t.numel() * t.element_size(), size(group))
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def gather(*tensors: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    """[S, *shape] for each of `tensors` (one shape, any dtypes): every rank's, in group-rank order, from one
    all_gather of their bytes. No gradient."""
    S, shape = size(group), tensors[0].shape
    if S == 1:
        return tuple(t.detach()[None] for t in tensors)
    cols = [t.detach().reshape(-1, 1).contiguous().view(torch.uint8) for t in tensors]  # [N, bytes per element]
    packed = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    out = packed.new_empty(S * packed.shape[0], packed.shape[1])
    TRAFFIC.add("all_gather", packed.numel(), S)
    _all_gather_single(out, packed, group=group)
    out = out.view(S, *packed.shape)
    result, at = [], 0
    for t, c in zip(tensors, cols):
        result.append(out[:, :, at : at + c.shape[1]].contiguous().view(t.dtype).view(S, *shape))
        at += c.shape[1]
    return tuple(result)


def _accumulation_dtype(tensors) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _ToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce(grad, ctx.group)
        return grad, None


class _FromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, *parts):
        ctx.meta = [(t.shape, t.dtype) for t in parts]
        dtype = _accumulation_dtype(parts)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in parts])
        all_reduce(flat, group)
        out, at = [], 0
        for shape, dt in ctx.meta:
            n = shape.numel()
            out.append(flat[at : at + n].view(shape).to(dt))
            at += n
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


class _ExclusiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        (parts,) = gather(t.to(_accumulation_dtype([t])), group=group)
        s = dist.get_group_rank(group, dist.get_rank())
        below = parts[:s].sum(0) if s else torch.zeros_like(parts[0])
        return below.to(t.dtype), parts.sum(0).to(t.dtype)

    @staticmethod
    def backward(ctx, grad_below, grad_total):
        s = dist.get_group_rank(ctx.group, dist.get_rank())
        (grads,) = gather(grad_below.to(_accumulation_dtype([grad_below])), group=ctx.group)
        later = grads[s + 1 :].sum(0)
        return (grad_total + later.to(grad_total.dtype)), None


def to_shards(t: torch.Tensor, group) -> torch.Tensor:
    """t (replicated over group) as the input of per-shard math: identity, gradient summed over group."""
    return t if size(group) == 1 or not t.requires_grad else _ToShards.apply(t, group)


def from_shards(*parts: torch.Tensor, group) -> tuple[torch.Tensor, ...]:
    """The sums over group of each rank's parts (one all_reduce, in fp32 or wider), each in its own dtype;
    the gradient of each sum goes to this rank's part unchanged."""
    return parts if size(group) == 1 else _FromShards.apply(group, *parts)


def exclusive_scan(t: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """t: this rank's part -> (sum of the parts of the lower group ranks, sum of all parts), differentiable."""
    return (torch.zeros_like(t), t) if size(group) == 1 else _ExclusiveScan.apply(t, group)
