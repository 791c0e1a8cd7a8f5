"""The ranks of tests/test_distributed.py: gloo on CPU, one thread each, started by torchrun.

    python -m torch.distributed.run --nproc-per-node N tests/dist_worker.py CHECK[:S[:S...]][,CHECK...]
    python -m torch.distributed.run --nproc-per-node N tests/dist_worker.py die --at STEP -- <sae train flags>

Every check compares the sharded model with one process (built on every rank, same seed, same weights) and
records failures; the worker prints one "FAIL <check>: ..." line per failure and "RESULT {json}" lines with
measurements, and exits 1 if anything failed. `die` runs `python -m sae train` and kills rank 1 after STEP steps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import kernels  # noqa: E402
import sae  # noqa: E402
from bench.distributed import exchange_bytes  # noqa: E402
from kernels import GatedCode, JumpReLUCode, SparseCode  # noqa: E402
from kernels import reference as ref  # noqa: E402
from sae import distributed  # noqa: E402
from sae.distributed import comm  # noqa: E402
from sae.distributed import trainer as dist_trainer  # noqa: E402
from sae.registry import ARCHITECTURES  # noqa: E402
from sae.synthetic import SyntheticActivations, SyntheticSource  # noqa: E402
from sae.trainer import TrainConfig, Trainer  # noqa: E402

FAILURES: list[str] = []
EXACT = 1e-10  # float64: only the summation order differs
FP32 = 1e-5  # the same in fp32 (DESIGN section 6)
SUMMED_IN_FP32 = {"penalty"}  # ReLUSAE.penalty sums in fp32 whatever the dtype: the shards' order shows at 1e-7
FP32_STEPS = 1e-4  # fp32, 20 Adam steps: see test_distributed.py


def expect(ok, what: str) -> None:
    if not ok:
        FAILURES.append(what)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale else (a - b).norm().item()


@functools.cache
def mesh_of(shards: int):
    return init_device_mesh("cpu", (dist.get_world_size() // shards, shards), mesh_dim_names=("dp", "shard"))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shard_part(model, name: str, full: torch.Tensor) -> torch.Tensor:
    """The part of a whole tensor that the sharded model's tensor `name` holds on this rank."""
    t = dict([*model.named_parameters(), *model.named_buffers()])[name]
    if isinstance(t, DTensor) and t.placements[1].is_shard():
        rows = model.latent_rows
        return full[rows.start : rows.stop]
    return full


@torch.no_grad()
def copy_into(sharded, single) -> None:
    for name, t in [*sharded.named_parameters(), *sharded.named_buffers()]:
        local(t).copy_(shard_part(sharded, name, dict([*single.named_parameters(), *single.named_buffers()])[name]))


# float64 twins of the public ops ----------------------------------------------------------------------------
# The ops take fp32 / fp16 / bf16 only; the float64 check runs one process and the shards on these twins, built on
# kernels.reference with each op's layout (the fp32 check runs the ops themselves).


def _slots(f: torch.Tensor, held: torch.Tensor, by_value: bool = False):
    """(values, indices, held) [B, C] of the held entries of a dense f [B, n]: by id (or by value, ties to the
    lower id), then empty slots (value 0, index 0); C the largest held count of a row (>= 1)."""
    C = max(int(held.sum(1).max()), 1)
    key = torch.where(held, f.detach(), -float("inf")) if by_value else (~held).to(torch.int8)
    idx = key.sort(dim=1, descending=by_value, stable=True).indices[:, :C]
    keep = held.gather(1, idx)
    return torch.where(keep, f.gather(1, idx), 0.0), torch.where(keep, idx, 0).to(torch.int32), keep


def topk_encode64(x, W, b, k, *, b_dec=None):
    return ref.topk_encode(x, W, b, k, b_dec=b_dec)


def batch_topk_encode64(x, W, b, k, *, b_dec=None, hints=None):
    f = ref.batch_topk(x, W, b, k, b_dec=b_dec)
    return SparseCode(*_slots(f, f > 0, by_value=True)[:2])


def relu_encode64(x, W, b, *, b_dec=None, capacity=None, hints=None):
    f = ref.relu(x, W, b, b_dec=b_dec)
    n = W.shape[0]
    if int((f > 0).sum(1).max()) > int(0.25 * n):  # kernels.relu's dense layout: every latent a slot
        return SparseCode(f, torch.arange(n, dtype=torch.int32).expand(f.shape[0], n))
    return SparseCode(*_slots(f, f > 0)[:2])


def jumprelu_encode64(x, W, b, threshold, *, bandwidth, b_dec=None, capacity=None, hints=None):
    f, l0 = ref.jumprelu(x, W, b, threshold, bandwidth, b_dec=b_dec)
    return JumpReLUCode(*_slots(f, ref.jumprelu_band(x, W, b, threshold, bandwidth, b_dec=b_dec))[:2], l0)


def batch_topk_inference64(x, W, b, threshold, *, b_dec=None, capacity=None, hints=None):
    theta = torch.full((W.shape[0],), float(threshold), dtype=x.dtype)
    f, _ = ref.jumprelu(x, W, b, theta, 1.0, b_dec=b_dec)
    return SparseCode(*_slots(f, f != 0)[:2])


def gated_encode64(x, W, b_gate, r_mag, b_mag, *, b_dec=None, capacity=None, hints=None):
    f, gate = ref.gated(x, W, b_gate, r_mag, b_mag, b_dec=b_dec)
    values, idx, keep = _slots(f, gate > 0)
    return GatedCode(values, idx, torch.where(keep, gate.gather(1, idx.long()), 0.0))


TWINS = {
    "topk_encode": topk_encode64,
    "batch_topk_encode": batch_topk_encode64,
    "batch_topk_inference": batch_topk_inference64,
    "relu_encode": relu_encode64,
    "jumprelu_encode": jumprelu_encode64,
    "gated_encode": gated_encode64,
    "sparse_decode": ref.sparse_decode,
    "prefix_losses": ref.prefix_losses,
}


@contextlib.contextmanager
def float64_ops():
    saved = {name: getattr(kernels, name) for name in TWINS}
    for name, fn in TWINS.items():
        setattr(kernels, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


# The same forward, losses, gradients and selections as one process ------------------------------------------

D, N, B = 12, 48, 9
CONFIGS = [  # (id, architecture, constructor arguments, d_sae, with a dead mask, transcoder)
    ("topk-rescale-aux", "topk", {"k": 4, "rescale_acts_by_decoder_norm": True, "aux_k": 5}, N, True, False),
    ("topk-k-above-n/S", "topk", {"k": 6, "normalize_activations": "layer_norm"}, 16, True, False),
    ("topk-transcoder", "topk", {"k": 4, "d_out": 7, "skip": True}, N, False, True),
    ("batchtopk-aux", "batchtopk", {"k": 3}, N, True, False),
    ("matryoshka-aux", "matryoshka", {"k": 3, "prefixes": [5, 20, 30, N]}, N, True, False),
    ("ordered", "ordered", {"k": 3}, N, False, False),
    ("jumprelu", "jumprelu", {"bandwidth": 0.5, "l0_coeff": 0.3}, N, False, False),
    ("gated-skip", "gated", {"l1_coeff": 0.5, "skip": True, "act_scale": 1.3}, N, False, False),
    ("relu-sparse", "relu", {"l1_coeff": 0.2, "init_sparse": True}, N, False, False),
    ("relu-dense", "relu", {"l1_coeff": 0.2, "normalize_activations": "constant_norm_rescale"}, N, False, False),
]


def perturbed(cls, n: int, kw: dict, gen: torch.Generator, dtype: torch.dtype, sparse: bool):
    """cls with every tensor moved off its init (sparse: b_enc mostly negative)."""
    model = cls(D, n, dtype=dtype, **kw)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dim() == 0:
                continue
            noise = 0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype)
            if name in ("threshold", "prefix_weights"):
                t.copy_(t + noise.abs())
            elif name == "b_enc" and sparse:
                t.copy_(noise - 0.4)  # most pre-activations below 0: the sparse layout
            else:
                t.copy_(t + noise)
    return model


def check_exact(shards: int, dtype: torch.dtype) -> None:
    """Every class (CONFIGS): the initial weights, run (train and eval mode), decode, the loss parts and every
    gradient of the sharded model against one process with the same weights; the same latents selected."""
    mesh = mesh_of(shards)
    gen = torch.Generator().manual_seed(1)
    tol = EXACT if dtype == torch.float64 else FP32
    for case, arch, kw, n, dead, transcoder in CONFIGS:
        cls, kw = ARCHITECTURES[arch], dict(kw)
        sparse = kw.pop("init_sparse", False)
        where = f"exact {str(dtype)[6:]} S={shards} {case}"
        torch.manual_seed(0)
        single = cls(D, n, dtype=dtype, **kw)
        torch.manual_seed(0)
        sharded = distributed.shard_model(cls, D, n, mesh, dtype=dtype, **kw)
        for name, t in [*sharded.named_parameters(), *sharded.named_buffers()]:
            init = shard_part(sharded, name, dict([*single.named_parameters(), *single.named_buffers()])[name])
            expect(torch.equal(local(t), init), f"{where}: initial {name} differs from one process's")
        single = perturbed(cls, n, kw, gen, dtype, sparse)
        copy_into(sharded, single)
        x = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
        target = torch.randn(B, kw["d_out"], generator=gen, dtype=torch.float64).to(dtype) if transcoder else None
        mask = torch.rand(n, generator=gen) < 0.4 if dead else None
        for mode in ("train", "eval"):
            single.train(mode == "train"), sharded.train(mode == "train")
            if mode == "eval" and isinstance(single, sae.BatchTopKSAE):
                single.threshold.fill_(0.4), sharded.threshold.fill_(0.4)
            code_1, out_1 = single.run(x)
            code_s, out_s = sharded.run(x)
            expect(rel(out_s, out_1) < tol, f"{where} {mode}: run output rel err {rel(out_s, out_1):.2e}")
            dense_1, dense_s = code_1.to_dense(n), code_s.to_dense(n)
            expect(torch.equal(dense_1 != 0, dense_s != 0), f"{where} {mode}: selected latents differ")
            expect(rel(dense_s, dense_1) < tol, f"{where} {mode}: code values differ")
            if arch == "topk":
                expect(torch.equal(code_1.indices, code_s.indices), f"{where}: TopK indices differ")
            decoded = sharded.decode(code_s)
            expect(rel(decoded, single.decode(code_1)) < tol, f"{where} {mode}: decode differs")
        single.train(), sharded.train()
        parts_1 = single.loss(x, dead_mask=mask, target=target)
        parts_s = sharded.loss(x, dead_mask=mask, target=target)
        parts_1.pop("code"), parts_s.pop("code")
        expect(parts_1.keys() == parts_s.keys(), f"{where}: loss parts {sorted(parts_s)} != {sorted(parts_1)}")
        for key in parts_1.keys() & parts_s.keys():
            err = rel(parts_s[key], parts_1[key])
            expect(err < (FP32 if key in SUMMED_IN_FP32 else tol), f"{where}: {key} rel err {err:.2e}")
        parts_1["loss"].backward()
        parts_s["loss"].backward()
        grads = {name: p.grad for name, p in single.named_parameters()}
        for name, p in sharded.named_parameters():
            if grads[name] is None:
                expect(p.grad is None, f"{where}: {name} has a gradient one process has not")
                continue
            err = rel(local(p.grad), shard_part(sharded, name, grads[name]))
            expect(err < tol, f"{where}: d{name} rel err {err:.2e}")
        if isinstance(single, sae.BatchTopKSAE):
            expect(rel(sharded.threshold, single.threshold) < tol, f"{where}: threshold EMA differs")


def check_exact64(shards: int) -> None:
    with float64_ops():
        check_exact(shards, torch.float64)


def check_exact32(shards: int) -> None:
    check_exact(shards, torch.float32)


# fp32: 20 training steps, sharded (and data-parallel) against one process -------------------------------------

STEP_ARCHS = [("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {}), ("gated", {}), ("relu", {"p": 0.8})]
STEP_ARCHS += [("matryoshka", {"k": 4, "prefixes": [8, 32, 64]}), ("ordered", {"k": 4})]


def train_pair(cls, kw: dict, mesh, *, batch: int, dead_tokens: int, steps: int = 20):
    """(one process's model, the sharded model) after `steps` steps from the same seed and data."""
    gen = SyntheticActivations(16, 48, 4, seed=3)
    cfg = dict(steps=steps, lr=3e-3, lr_warmup_steps=2, log_every=5, stats_tokens=512, eval_tokens=512)
    cfg |= dict(dead_tokens=dead_tokens, progress=False, p_end=0.5 if cls is sae.ReLUSAE else None, anneal_every=3)
    torch.manual_seed(0)
    single = cls(16, 64, **kw)
    Trainer(single, SyntheticSource(gen, batch, seed=1), TrainConfig(**cfg)).fit()
    torch.manual_seed(0)
    sharded = distributed.shard_model(cls, 16, 64, mesh, **kw)
    summary = distributed.DistributedTrainer(sharded, SyntheticSource(gen, batch, seed=1), TrainConfig(**cfg)).fit()
    return single, sharded, summary


def check_steps(shards: int) -> None:
    """fp32: every class on a shard-only mesh (AuxK on: 200 dead tokens); with data groups, TopK without AuxK
    (its FVU normalisation is per data group, not per whole batch)."""
    mesh = mesh_of(shards)
    dp = mesh["dp"].size()
    archs = STEP_ARCHS if dp == 1 else [("topk", {"k": 4})]
    dist_trainer.BUCKET_BYTES = 1024  # the weight rows are averaged during backward, the vectors after it
    early, average_now = [], dist_trainer.DistributedTrainer._average_now
    dist_trainer.DistributedTrainer._average_now = lambda self, p: (early.append(p.shape), average_now(self, p))[1]
    worst = 0.0
    for arch, kw in archs:
        dead_tokens = 200 if dp == 1 else 10**9
        single, sharded, summary = train_pair(ARCHITECTURES[arch], kw, mesh, batch=64, dead_tokens=dead_tokens)
        where = f"steps S={shards} dp={dp} {arch}"
        tensors = dict([*single.named_parameters(), *single.named_buffers()])
        for name, t in [*sharded.named_parameters(), *sharded.named_buffers()]:
            err = rel(local(t), shard_part(sharded, name, tensors[name]))
            worst = max(worst, err)
            expect(err < FP32_STEPS, f"{where}: {name} rel err {err:.2e} after 20 steps")
        for name in ("b_dec",):  # replicated: bit-identical on every rank
            mine = local(getattr(sharded, name)).detach()
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            expect(all(torch.equal(e, mine) for e in every), f"{where}: {name} differs between ranks")
        expect(abs(sharded.act_scale - single.act_scale) < 1e-6, f"{where}: act_scale")
        expect(summary["tokens"] == 20 * 64, f"{where}: tokens {summary['tokens']}")
    dist_trainer.DistributedTrainer._average_now = average_now
    expect(len(early) == (0 if dp == 1 else 2 * 20), f"steps dp={dp}: {len(early)} gradients averaged in backward")
    print("RESULT " + json.dumps({"check": f"steps S={shards} dp={dp}", "worst_rel_err": worst}), flush=True)


# Bytes per step ---------------------------------------------------------------------------------------------


def wchar() -> int:
    """Bytes this process wrote through write syscalls (gloo sends through writev on TCP sockets)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def check_traffic(shards: int) -> None:
    """TopK, B=256, d=64, n=4096, k=8: the bytes a rank sends in one training step are the candidates and the
    sums of the design, not weights."""
    mesh = mesh_of(shards)
    Bt, d, n, k = 256, 64, 4096, 8
    torch.manual_seed(0)
    model = distributed.shard_model(sae.TopKSAE, d, n, mesh, k=k)
    source = SyntheticSource(SyntheticActivations(d, 256, 8, seed=0), Bt)
    cfg = TrainConfig(steps=3, stats_tokens=512, progress=False, dead_tokens=10**9, log_every=100)
    trainer = distributed.DistributedTrainer(model, source, cfg)
    trainer._init_from_data()
    trainer._train_step(trainer.source.next_batch())  # warm up
    x = trainer.source.next_batch()
    dist.barrier()
    comm.TRAFFIC.reset()
    before = wchar()
    trainer._train_step(x)
    sent = wchar() - before
    design = exchange_bytes(Bt, d, k, shards, 4)  # the model bench/NOTES.md scales to 8 H100s
    modelled = sum(design.values())
    weights = 2 * n * d * 4
    expect(comm.TRAFFIC.total() == modelled, f"traffic: counted {dict(comm.TRAFFIC.sent)} != design {modelled}")
    expect(modelled <= sent <= 1.02 * modelled + 4096, f"traffic: measured {sent} B, design {modelled} B")
    expect(sent < weights / 10, f"traffic: {sent} B sent, weights are {weights} B")
    print("RESULT " + json.dumps({"check": "traffic", "sent": sent, "design": design, "weights": weights}), flush=True)


# A running model as the source --------------------------------------------------------------------------


def check_live(shards: int) -> None:
    """A running model as the source, with data groups: each group runs the model on its own batches of input
    ids (every G-th), a group's ranks on the same ones; every group's data position goes into the checkpoint, and
    such a checkpoint resumes only on as many data groups."""
    from sae.harvest import Harvester, HarvestSource

    mesh = mesh_of(shards)
    dp, group = mesh["dp"].size(), mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    lm = torch.nn.Sequential(torch.nn.Embedding(40, 8), torch.nn.Linear(8, 8))
    batches = [torch.randint(40, (2, 5), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    number = {tuple(b.flatten().tolist()): i for i, b in enumerate(batches)}
    ran = set()
    lm[0].register_forward_hook(lambda _m, inputs, _o: ran.add(number.get(tuple(inputs[0].flatten().tolist()))))
    source = HarvestSource(Harvester(lm, "1"), batches, 16, buffer_tokens=20, seed=0)
    model = distributed.shard_model(sae.TopKSAE, 8, 32, mesh, k=4)
    cfg = TrainConfig(steps=6, lr=1e-3, log_every=3, stats_tokens=40, eval_tokens=40, progress=False)
    trainer = distributed.DistributedTrainer(model, source, cfg)
    summary = trainer.fit()
    mine = sorted(ran - {None})
    expect(mine and all(i % dp == group for i in mine), f"live: group {group} ran the model on batches {mine}")
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (group, mine))
    expect(all(m == mine for g, m in every if g == group), f"live: one group's ranks ran on other batches: {every}")
    expect(summary["tokens"] == 6 * 16, f"live: {summary['tokens']} tokens in 6 steps of 16")
    state = trainer.state_dict()
    small = torch.load(io.BytesIO(state["trainer"]), weights_only=False)
    expect(small["source"][group] == trainer.source.state_dict(), f"live: checkpointed positions {small['source']}")
    small["source"] = [{"epoch": 0, "first": 0, "pos": 0, "part": [g, dp + 1]} for g in range(dp + 1)]
    blob = io.BytesIO()
    torch.save(small, blob)
    try:
        trainer.load_state_dict(state | {"trainer": blob.getvalue()})
        expect(False, "live: a checkpoint of other data groups' positions was loaded")
    except ValueError as e:
        expect(f"resume it with {dp + 1} data groups" in str(e), f"live: {e}")
    print("RESULT " + json.dumps({"check": f"live S={shards} dp={dp}", "batches": mine}), flush=True)


# A rank that dies -------------------------------------------------------------------------------------------


def die(at: int, argv: list[str]) -> None:
    """`python -m sae train argv`, with rank 1 killed (os._exit) right after step `at`."""
    from sae.__main__ import main
    from sae.distributed.trainer import DistributedTrainer

    step = DistributedTrainer._train_step

    def dying(self, *batch):
        parts = step(self, *batch)
        if self.step == at and dist.get_rank() == 1:
            os._exit(17)
        return parts

    DistributedTrainer._train_step = dying
    main(["train", *argv])


CHECKS = {
    "exact64": check_exact64,
    "exact32": check_exact32,
    "steps": check_steps,
    "traffic": check_traffic,
    "live": check_live,
}


def main() -> int:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    own, train_flags = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser()
    parser.add_argument("checks", help="CHECK[:S[:S...]],... (latent shard counts, default 2) or die")
    parser.add_argument("--at", type=int, default=0)
    args = parser.parse_args(own)
    if args.checks == "die":
        die(args.at, train_flags)
        return 0
    dist.init_process_group("gloo")
    for spec in args.checks.split(","):
        name, *shards = spec.split(":")
        for S in shards or ["2"]:
            CHECKS[name](int(S))
    for line in FAILURES:
        print(f"FAIL rank {dist.get_rank()} {line}", flush=True)
    ok = torch.tensor([len(FAILURES)])
    dist.all_reduce(ok)
    distributed.close()
    return 1 if int(ok) else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # the checks are done: skip the interpreter's teardown of gloo's threads (not under test)
