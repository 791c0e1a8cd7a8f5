"""Past one GPU: exact latent-sharded x data-parallel training on torch.distributed (DESIGN section 9).

mesh.py        the 2-D device mesh [data groups, latent shards] over the ranks torchrun started
model.py       shard_model: an SAE class whose per-latent tensors are DTensors Shard(0); exact sharded loss/run
select.py      the exact global TopK / BatchTopK selections from every shard's candidates
comm.py        the step's collectives (with their gradients) and the bytes they send
trainer.py     DistributedTrainer: sae.Trainer with averaged gradients, merged statistics, DCP checkpoints
checkpoint.py  DCP checkpoints, complete or absent, resharded on load

torch.manual_seed(0)
mesh = init_mesh(latent_shards=2, device="cuda")             # under torchrun --nproc-per-node N
model = shard_model(sae.TopKSAE, 4096, 2**22, mesh, k=64, device="cuda")
DistributedTrainer(model, source, TrainConfig(out_dir="run")).fit()   # run/sae: one folder, sae.load reads it
"""

from .comm import TRAFFIC
from .mesh import close, init_mesh, launched
from .model import ShardedSAE, gather_model, shard_model
from .trainer import DistributedTrainer

__all__ = [
    "TRAFFIC",
    "DistributedTrainer",
    "ShardedSAE",
    "close",
    "gather_model",
    "init_mesh",
    "launched",
    "shard_model",
]
