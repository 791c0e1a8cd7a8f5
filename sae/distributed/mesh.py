"""The 2-D device mesh of a sharded run: data-parallel groups x latent shards (torch.distributed.device_mesh).

Ranks are laid out [world / S, S]: consecutive ranks form one data group (they read one batch and split the
latents between them, so the per-step exchanges stay inside a node), and rank r of every data group holds the
same latent rows (its gradients are averaged over the data groups).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DP, SHARD = "dp", "shard"  # the mesh's dimension names


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def init_mesh(latent_shards: int = 1, device: str | torch.device = "cpu", *, timeout_s: float = 600) -> DeviceMesh:
    """The mesh [world / latent_shards, latent_shards] (dims "dp", "shard") over the ranks the launcher started.

    Starts the process group when none is running: NCCL for CUDA (each rank on the GPU of its LOCAL_RANK), gloo
    for CPU; a collective that waits longer than timeout_s fails, so a lost rank ends the run instead of
    hanging it (under torchrun, the death of any rank stops all of them at once).
    """
    if isinstance(latent_shards, bool) or not isinstance(latent_shards, int) or latent_shards < 1:
        raise ValueError(f"latent_shards must be a positive int, got {latent_shards!r}")
    kind = torch.device(device).type
    if not dist.is_initialized():
        if not launched():
            raise RuntimeError(
                "sae.distributed needs the processes of a launcher: run `torchrun --nproc-per-node N -m sae train "
                "--latent-shards S ...` (N a multiple of S)"
            )
        if kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % latent_shards:
        raise ValueError(f"latent_shards={latent_shards} must divide the number of ranks ({world})")
    return init_device_mesh(kind, (world // latent_shards, latent_shards), mesh_dim_names=(DP, SHARD))


def shard_rows(mesh: DeviceMesh, n: int) -> range:
    """The latent rows this rank holds: an equal, contiguous share of n by its position on the shard dimension."""
    S = mesh[SHARD].size()
    if n % S:
        raise ValueError(f"d_sae={n} must be divisible by the number of latent shards ({S})")
    s = mesh[SHARD].get_local_rank()
    return range(s * n // S, (s + 1) * n // S)


def close() -> None:
    """Leave the process group (after a barrier, so no rank tears it down while another still talks)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
