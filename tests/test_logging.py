"""Run logs: a short run logs to log.jsonl, TensorBoard and W&B (offline) at once; the TensorBoard event file
and the W&B offline history are read back and every value compared with log.jsonl."""

import json
import struct
from pathlib import Path

import pytest
import torch

import sae
from sae.data import TensorSource
from sae.runlog import scalars
from sae.trainer import TrainConfig, Trainer


def run(tmp_path, monkeypatch, log):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    torch.manual_seed(0)
    model = sae.TopKSAE(16, 48, 3, aux_k=8)
    out = str(tmp_path / "run")
    cfg = TrainConfig(steps=12, log_every=3, eval_every=6, eval_tokens=256, stats_tokens=256, lr_warmup_steps=2,
                      dead_tokens=64, checkpoint_every=0, out_dir=out, log=log, progress=False)  # fmt: skip
    Trainer(model, TensorSource(torch.randn(2048, 16), 64), cfg).fit()
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], model.d_sae


def expected(records, d_sae) -> dict[tuple[int, str], float]:
    out = {}
    for r in records:
        out.update({(r["step"], name): v for name, v in scalars(r, d_sae).items()})
    return out


def tensorboard_scalars(folder: Path) -> dict[tuple[int, str], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def wandb_history(folder: Path) -> dict[tuple[int, str], float]:
    """The history rows of an offline run's .wandb file: a log of 32 KiB blocks whose records (7-byte header:
    crc32, length, type full / first / middle / last) hold wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf, out = path.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # full, last
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out.update({(row["_step"], k): v for k, v in row.items() if not k.startswith("_")})
    return out


def test_every_value_reaches_tensorboard_and_wandb(tmp_path, monkeypatch):
    records, d_sae = run(tmp_path, monkeypatch, "jsonl,tensorboard,wandb")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [3, 6, 9, 12] and sum("eval" in r for r in records) == 2  # step 6 and the final one
    want = expected(records, d_sae)
    last = next(r for r in records if r["step"] == 12 and "loss" in r)
    # SAELens's names where the value means the same
    assert want[12, "losses/overall_loss"] == last["loss"] and want[12, "losses/mse_loss"] == last["mse"]
    assert want[12, "metrics/l0"] == last["l0"] and want[12, "details/current_learning_rate"] == last["lr"]
    assert want[12, "metrics/explained_variance"] == pytest.approx(1 - last["fvu"])
    assert want[12, "sparsity/dead_features"] == round(last["dead_fraction"] * d_sae)
    assert want[12, "details/n_training_tokens"] == 12 * 64 and (12, "losses/aux") in want
    assert (6, "eval/fvu") in want and (12, "eval/c_dec") in want
    for name, got in (("tensorboard", tensorboard_scalars(tmp_path / "run" / "tensorboard")),
                      ("wandb", wandb_history(tmp_path / "run"))):  # fmt: skip
        assert set(got) == set(want), name
        for key, v in want.items():
            assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-7), (name, key)  # TensorBoard keeps float32


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(FileNotFoundError):
        run(tmp_path, monkeypatch, "jsonl,tensorboard")
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_unknown_log_kind_is_named():
    with pytest.raises(ValueError, match=r"log: unknown run logs \['tb'\]; choose from jsonl, tensorboard, wandb"):
        TrainConfig(log="jsonl,tb")
