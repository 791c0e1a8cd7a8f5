"""Transcoders: (input, target) pairs from memory, shard folders and harvests, trained by every architecture
(with and without a skip connection), on synthetic ground truth whose target is a known linear map."""

import json

import numpy as np
import pytest
import torch

import sae
from sae import metrics
from sae.data import ShardSource, TensorSource, write_shard
from sae.registry import ARCHITECTURES
from sae.synthetic import SyntheticActivations, feature_recovery
from sae.trainer import TrainConfig, Trainer

D_IN, D_OUT = 16, 12
KW = {"topk": {"k": 3}, "batchtopk": {"k": 3}, "matryoshka": {"k": 3, "prefixes": [8, 16, 32]}, "ordered": {"k": 3}}
# SAELens's transcoder architectures; the others are saved in our own layout (SAELens has no such transcoder)
SAELENS = {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
           ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n=4096, d_in=D_IN, d_out=D_OUT, n_features=32, seed=1, **kw):
    """x = acts F (features in superposition) and the target y = x A^T for a known map A [d_out, d_in]."""
    gen = SyntheticActivations(d_in, n_features, 3, seed=0, **kw)
    g = torch.Generator().manual_seed(seed)
    x, _ = gen.sample(n, g)
    A = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    return gen, x, x @ A.T, A


def cfg(steps, **kw):
    return TrainConfig(steps=steps, lr=1e-2, lr_warmup_steps=5, log_every=10, progress=False, eval_tokens=1024,
                       stats_tokens=1024, checkpoint_every=0, **kw)  # fmt: skip


def test_topk_transcoder_recovers_the_mapped_features():
    """The target's features are the rows of F A^T: the decoder finds them; FVU is measured against y."""
    gen, x, y, A = pairs(1 << 14, d_out=20, exact_l0=True)
    torch.manual_seed(0)
    model = sae.TopKSAE(D_IN, 32, 3, d_out=20)
    trainer = Trainer(model, TensorSource(x, 256, targets=y), cfg(400))
    final = trainer.fit()["eval"]
    assert feature_recovery(model.W_dec, gen.features @ A.T) > 0.8
    ex, ey = trainer.eval_data()[:, :D_IN], trainer.eval_data()[:, D_IN:]
    with torch.no_grad():
        assert final["fvu"] == pytest.approx(metrics.fvu(ey, model(ex)).item(), rel=1e-4) and final["fvu"] < 0.25
    assert not model.apply_b_dec_to_input


def test_skip_transcoder_learns_the_linear_map():
    """y = x A^T is linear: the skip connection takes it all (W_skip -> A) and the L1 penalty turns the latents off."""
    _, x, y, A = pairs()
    torch.manual_seed(0)
    model = sae.ReLUSAE(D_IN, 32, d_out=D_OUT, skip=True)
    final = Trainer(model, TensorSource(x, 128, targets=y), cfg(200)).fit()["eval"]
    assert ((model.W_skip - A).norm() / A.norm()).item() < 0.01
    assert final["fvu"] < 1e-4 and final["l0"] < 0.05


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_trains_as_a_transcoder(tmp_path, name, skip):
    _, x, y, _ = pairs()
    torch.manual_seed(0)
    model = ARCHITECTURES[name](D_IN, 32, d_out=D_OUT, skip=skip, **KW.get(name, {}))
    trainer = Trainer(model, TensorSource(x, 128, targets=y), cfg(40, out_dir=str(tmp_path)))
    final = trainer.fit()["eval"]
    assert final["fvu"] < 0.7 * trainer.history[0]["fvu"]  # learning the target, not the input
    saved = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == SAELENS.get((name, skip), ARCHITECTURES[name].architecture)
    assert saved["d_in"] == D_IN and saved["d_out"] == D_OUT
    loaded = sae.load(tmp_path / "sae")
    with torch.no_grad():
        xs = x[:64]
        torch.testing.assert_close(loaded(xs), model.eval()(xs), rtol=1e-5, atol=1e-5)


def test_sources_and_models_must_agree_on_pairs():
    _, x, y, _ = pairs(256)
    with pytest.raises(ValueError, match=r"the source has no targets, but the model has d_out=12 \(d_in=16\)"):
        Trainer(sae.TopKSAE(D_IN, 32, 3, d_out=D_OUT), TensorSource(x, 64))
    with pytest.raises(ValueError, match=r"the source has targets of d_out=12, but the model has d_out=16"):
        Trainer(sae.TopKSAE(D_IN, 32, 3), TensorSource(x, 64, targets=y))
    with pytest.raises(ValueError, match=r"targets must be \[N=256, d_out\]"):
        TensorSource(x, 64, targets=y[:10])


def write_pairs(folder, sizes, suffix=".npy"):
    """Shards whose target row is a known function of its input row: y = [2 x0 + 1, x0] for x = [x0, x0, x0]."""
    start = 0
    for i, n in enumerate(sizes):
        x0 = torch.arange(start, start + n, dtype=torch.float32)[:, None]
        write_shard(folder / f"shard-{i:05d}{suffix}", x0.repeat(1, 3))
        write_shard(folder / "targets" / f"shard-{i:05d}{suffix}", torch.cat([2 * x0 + 1, x0], 1))
        start += n
    return start


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_shard_folder_with_targets_yields_aligned_pairs(tmp_path, suffix):
    (tmp_path / "targets").mkdir()
    total = write_pairs(tmp_path, [50, 37, 64], suffix)
    src = ShardSource(tmp_path, 20, buffer_tokens=40, chunk_tokens=16, seed=3)
    assert (src.d_in, src.d_out) == (3, 2)
    rows = torch.cat([src.next_batch() for _ in range(total // 20 + 3)])  # past an epoch boundary
    assert rows.shape[1] == 5
    x0 = rows[:, 0]
    assert torch.equal(rows[:, 3], 2 * x0 + 1) and torch.equal(rows[:, 4], x0)
    assert sorted(x0[: total - total % 20].tolist())[:5] == [0, 1, 2, 3, 4] and x0[:20].tolist() != list(range(20))
    s = src.sample(30)
    assert torch.equal(s[:, 3], 2 * s[:, 0] + 1)
    assert ShardSource(tmp_path, 20, targets=tmp_path / "targets").d_out == 2


def test_shard_targets_errors_name_the_file(tmp_path):
    (tmp_path / "targets").mkdir()
    write_pairs(tmp_path, [10, 10])
    (tmp_path / "targets" / "shard-00001.npy").unlink()
    with pytest.raises(ValueError, match=r"targets=.* has no target shard for \['shard-00001.npy'\]"):
        ShardSource(tmp_path, 4)
    np.save(tmp_path / "targets" / "shard-00001.npy", np.zeros((9, 2), np.float32))
    with pytest.raises(ValueError, match=r"shard-00001.npy: 9 target rows for 10 input rows"):
        ShardSource(tmp_path, 4)


def test_topk_transcoder_in_sparsify_layout(tmp_path):
    """sparsify has TopK transcoders (d_out == d_in): the trained model written in its layout, read back, and
    its forward pass as sparsify computes it (ReLU, top-k, decode, + W_skip x; no centering when transcoding)."""
    _, x, y, _ = pairs(d_out=D_IN)
    torch.manual_seed(0)
    model = sae.TopKSAE(D_IN, 32, 3, skip=True, apply_b_dec_to_input=False)
    Trainer(model, TensorSource(x, 128, targets=y), cfg(30)).fit()
    assert model.act_scale != 1.0  # folded into the weights on the way out
    sae.save(model, tmp_path / "sp", format="sparsify")
    saved = json.loads((tmp_path / "sp" / "cfg.json").read_text())
    assert saved | {"num_latents": 32, "k": 3, "transcode": True, "skip_connection": True, "d_in": D_IN} == saved
    from safetensors.torch import load_file

    t = {k: v.double() for k, v in load_file(str(tmp_path / "sp" / "sae.safetensors")).items()}
    xs = x[:50].double()
    top = (xs @ t["encoder.weight"].T + t["encoder.bias"]).relu().topk(3, dim=-1)
    ref = (top.values[..., None] * t["W_dec"][top.indices]).sum(1) + t["b_dec"] + xs @ t["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x[:50]).double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.load(tmp_path / "sp")(x[:50]), model(x[:50]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sparsify's layout holds TopK SAEs only, not ReLUSAE"):
        sae.save(sae.ReLUSAE(D_IN, 32), tmp_path / "x", format="sparsify")
    with pytest.raises(ValueError, match="needs d_out == d_in"):
        sae.save(sae.TopKSAE(D_IN, 32, 3, d_out=D_OUT), tmp_path / "x", format="sparsify")
