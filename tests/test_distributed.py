"""sae.distributed on gloo CPU ranks started by torchrun (tests/dist_worker.py), against one process.

Tolerances:
  float64   1e-10 relative, every class: forward, loss parts and gradients differ only by the summation order
            of the shards' partial sums (~1e-16); the kernels take fp32 / fp16 / bf16 only, so one process and
            the shards both run float64 twins of the ops built on kernels.reference. Exception: ReLU's penalty
            value, which the class sums in fp32 whatever the dtype (1e-5).
  fp32      1e-5 for one step with the real ops, and the same selected latents.
  20 steps  1e-4 relative per tensor, fp32, every class: the sums differ in their last bits (~1e-7 relative per
            step, what the measured errors mostly are); Adam divides each gradient by its own RMS, so where a
            gradient is near 0 its rounding shows at up to lr per step (measured worst 6e-6). A wrong selection or
            a missing gradient term shows at 1e-2 or more.
Every launch has a timeout and kills its process group on expiry; torchrun --standalone picks a free port.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import sae
from bench.distributed import run_ranks
from sae import base
from sae.__main__ import main
from sae.data import BatchPart, TensorSource
from sae.distributed import select
from sae.distributed.checkpoint import checkpoints

WORKER = str(Path(__file__).with_name("dist_worker.py"))
STEPS_TOLERANCE = 1e-4
FLAGS = [  # a small TopK run; AuxK off, so that any split of the batch over data groups is the same math
    *("--synthetic-d", "16", "--expansion", "4", "--k", "4", "--batch-size", "256", "--steps", "20"),
    *("--stats-tokens", "512", "--eval-tokens", "512", "--log-every", "5", "--checkpoint-every", "10"),
    *("--dead-tokens", "1000000", "--progress", "false"),
]


def launch(ranks: int, *args: str, timeout: float = 240) -> tuple[int, str, float]:
    """torchrun --standalone with `ranks` ranks of `args` -> (exit code, output, seconds); kills every process of
    the run after `timeout` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    try:
        done = run_ranks(ranks, list(args), timeout=timeout, env=env, capture=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(args)} on {ranks} ranks did not end within {timeout} s:\n{(e.output or '')[-4000:]}")
    return done.returncode, done.stdout, time.perf_counter() - start


def checks(ranks: int, spec: str) -> list[dict]:
    """Run worker checks; fail with every FAIL line; return the RESULT records."""
    code, out, _ = launch(ranks, WORKER, spec)
    # ranks share one stdout, so a record may follow another rank's output on the same line: find every marker
    fails = re.findall(r"FAIL [^\n]*", out)
    assert code == 0 and not fails, "\n".join(fails) or out[-4000:]
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(out, m.end())[0] for m in re.finditer(r"RESULT ", out)]


def tensors(path) -> dict[str, torch.Tensor]:
    model = sae.load(path)
    return dict([*model.named_parameters(), *model.named_buffers()])


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = ((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{k}: rel err {err:.2e} > {tol}"


# One process: the pieces -----------------------------------------------------------------------------------


def test_rows_drawn_block_by_block_equal_one_draw():
    """Any row range of the counter-seeded init, across block edges, is the same rows; a model built inside
    latent_rows holds exactly its rows of the whole model's W_enc / W_dec."""
    n, d = 2 * base.INIT_BLOCK + 77, 5
    whole = base.init_rows(7, range(n), d, 0, "cpu")
    for rows in (range(0, 3), range(1000, 1100), range(base.INIT_BLOCK - 1, n)):
        assert torch.equal(base.init_rows(7, rows, d, 0, "cpu"), whole[rows.start : rows.stop])
    assert not torch.equal(base.init_rows(7, range(n), d, 1, "cpu"), whole)  # W_enc's stream differs
    torch.manual_seed(3)
    full = sae.TopKSAE(d, 64, 4, d_out=6)
    torch.manual_seed(3)
    with base.latent_rows(range(16, 48)):
        part = sae.TopKSAE(d, 64, 4, d_out=6)
    assert torch.equal(part.W_dec, full.W_dec[16:48]) and torch.equal(part.W_enc, full.W_enc[16:48])
    assert torch.equal(part.b_enc, full.b_enc)  # vectors stay whole (the shard slices them)
    with pytest.raises(ValueError, match="non-empty range"):
        with base.latent_rows(range(0)):
            pass


def test_global_selections_match_one_sort():
    """topk_winners over shuffled shard blocks = the stable top-k of the row (ties to the lower id); the
    BatchTopK cut keeps exactly the B k best (ties: lower row, then lower id), padding never kept."""
    g = torch.Generator().manual_seed(0)
    f = torch.randint(0, 4, (6, 40), generator=g).float()  # many ties
    f[0] = 0  # an all-zero row: zeros at the lowest ids
    ids = torch.randperm(40, generator=g).expand(6, 40)
    win = select.topk_winners(f.gather(1, ids), ids, 5)
    expected = torch.sort(f, dim=1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(ids.gather(1, win), expected)
    values = torch.cat([f.reshape(-1), torch.full((7,), -1.0)])
    keys = torch.cat([torch.arange(240), torch.zeros(7, dtype=torch.long)])
    perm = torch.randperm(247, generator=g)
    cut = select.batch_topk_cut(values[perm], keys[perm], 30)
    kept = select.kept(values, keys, cut)
    best = torch.sort(f.reshape(-1), descending=True, stable=True).indices[:30]
    assert torch.equal(kept[:240].nonzero().squeeze(1), best.sort().values) and not kept[240:].any()
    assert select.batch_topk_cut(values, keys, 10_000) is None


def test_data_groups_split_each_batch_and_keep_pairs():
    acts, targets = torch.randn(64, 3), torch.randn(64, 2)
    whole = TensorSource(acts, 16, targets=targets, seed=1)
    parts = [TensorSource(acts, 16, targets=targets, seed=1).part(g, 4) for g in range(4)]
    for _ in range(5):  # past an epoch
        assert torch.equal(whole.next_batch(), torch.cat([p.next_batch() for p in parts]))
    assert parts[0].batch_size == 4 and parts[0].d_out == 2
    with pytest.raises(ValueError, match="divisible by the data groups"):
        BatchPart(whole, 0, 3)


def test_latent_shards_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="--latent-shards 2: .*torchrun --nproc-per-node N"):
        main(["train", "--latent-shards", "2", "--steps", "1"])


# Ranks ------------------------------------------------------------------------------------------------------


def test_two_ranks_exact_every_class_and_bytes_per_step():
    """2 ranks, 2 latent shards: float64 and fp32 equality for every class; 20 fp32 steps of every class; the
    bytes a rank sends in a TopK step, measured at the socket (/proc/self/io), are the design's."""
    results = {r["check"]: r for r in checks(2, "exact64,exact32,steps,traffic")}
    assert results["steps S=2 dp=1"]["worst_rel_err"] <= STEPS_TOLERANCE
    traffic = results["traffic"]
    assert traffic["sent"] < traffic["weights"] / 10


def test_four_ranks_exact_and_data_parallel_steps():
    """4 ranks: 4 latent shards, and 2 data groups x 2 shards, exact; 20 TopK steps on 2 x 2 equal one process
    with the whole batch (gradients averaged over the data groups, firing merged); a running model as the source
    runs on each group's own input ids."""
    results = {r["check"]: r for r in checks(4, "exact64:4:2,exact32:4:2,steps:2,live:2")}
    assert results["steps S=2 dp=2"]["worst_rel_err"] <= STEPS_TOLERANCE
    assert results["live S=2 dp=2"]["batches"]


def test_a_hanging_run_is_killed_whole(tmp_path):
    """Past its timeout every process of a run is killed: torchrun runs each rank in a session of its own, where
    killing torchrun's process group would not reach it (and the rank would hold the output pipe open)."""
    script = tmp_path / "hang.py"
    script.write_text("import time\ntime.sleep(600)\n")
    start = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        run_ranks(2, [str(script)], timeout=20, capture=True)
    assert time.perf_counter() - start < 60
    cmdlines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmdlines.append(path.read_bytes())
    assert not [c for c in cmdlines if str(script).encode() in c]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """`torchrun --nproc-per-node 2 -m sae train --latent-shards 2`, checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("sharded")
    code, log, _ = launch(2, "-m", "sae", "train", "--latent-shards", "2", *FLAGS, "--out-dir", str(out))
    assert code == 0, log[-4000:]
    assert [step for step, _ in checkpoints(out / "checkpoints")] == [10, 20]
    return out


def test_torchrun_writes_the_single_process_sae(sharded_run, tmp_path):
    main(["train", *FLAGS, "--out-dir", str(tmp_path)])
    assert type(sae.load(sharded_run / "sae")) is sae.TopKSAE
    assert_close(tensors(sharded_run / "sae"), tensors(tmp_path / "sae"), STEPS_TOLERANCE)
    logged = [json.loads(line) for line in (sharded_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 20] and logged[-2]["tokens"] == 20 * 256


@pytest.mark.parametrize("shards,ranks", [(1, 2), (4, 4)], ids=["1-shard-2-data-groups", "4-shards"])
def test_checkpoint_of_2_shards_resumes_on_other_layouts(sharded_run, tmp_path, shards, ranks):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(sharded_run / "checkpoints" / "ckpt-000000010", tmp_path / "checkpoints" / "ckpt-000000010")
    args = ("-m", "sae", "train", "--latent-shards", str(shards), *FLAGS, "--resume", "true")
    code, log, _ = launch(ranks, *args, "--out-dir", str(tmp_path))
    assert code == 0, log[-4000:]
    assert_close(tensors(tmp_path / "sae"), tensors(sharded_run / "sae"), STEPS_TOLERANCE)


def test_a_dying_rank_ends_the_run_and_resuming_loses_nothing(sharded_run, tmp_path):
    """Rank 1 exits after step 13: the run stops (no hang) with an error naming the step and the checkpoints;
    the complete checkpoint of step 10 resumes to the uninterrupted run's SAE, bit for bit; an incomplete
    checkpoint folder (no .metadata) is never used."""
    code, log, seconds = launch(2, WORKER, "die", "--at", "13", "--", "--latent-shards", "2", *FLAGS,
                                "--out-dir", str(tmp_path), timeout=120)  # fmt: skip
    assert code != 0 and seconds < 120
    assert "a collective failed at step 14" in log or "exitcode  : 17" in log, log[-4000:]
    assert [step for step, _ in checkpoints(tmp_path / "checkpoints")] == [10]
    (tmp_path / "checkpoints" / "ckpt-000000015").mkdir()  # torn: never completed
    args = ("-m", "sae", "train", "--latent-shards", "2", *FLAGS, "--resume", "true")
    code, log, _ = launch(2, *args, "--out-dir", str(tmp_path))
    assert code == 0, log[-4000:]
    assert_close(tensors(tmp_path / "sae"), tensors(sharded_run / "sae"), 0.0)


def test_bench_case_runs_and_the_h100_model_holds(tmp_path):
    """python -m bench.distributed on a tiny shape writes its results; the NOTES.md model's largest n."""
    from bench import distributed as bench_distributed

    assert bench_distributed.main(["--shape", "64,16,256,4", "--steps", "1", "--results-dir", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "distributed-cpu.json").read_text())
    assert rec["sent_bytes_model"] == sum(rec["sent_bytes_design"].values()) <= rec["sent_bytes_wchar"]
    assert (tmp_path / "distributed-cpu.md").is_file()
    assert bench_distributed.largest_n(768) == 2**24 and bench_distributed.largest_n(4096) == 2**22
    assert not bench_distributed.model_step(2**22, 4096, precision="bf16")["fits"]
