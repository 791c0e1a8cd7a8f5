"""The trainer on synthetic ground truth: recovery, the c_dec sweep, exact resume, schedules, every class."""

import json
import math

import pytest
import torch
from conftest import DEVICE
from helpers import AllocationRecorder

import kernels
import sae
from sae import metrics
from sae.__main__ import main
from sae.data import TensorSource
from sae.synthetic import SyntheticActivations, SyntheticSource, feature_recovery
from sae.trainer import TrainConfig, Trainer

RECOVERY_BAR = 0.9


def quiet(**kw):
    return TrainConfig(progress=False, **kw)


def test_topk_recovers_true_features_at_true_l0(one_thread):
    """d=32, 128 features (4x superposition), true L0 = 5: a TopK SAE at k = 5 finds them (MMCS > 0.9)."""
    gen = SyntheticActivations(32, 128, 5, seed=1)
    torch.manual_seed(0)
    model = sae.TopKSAE(32, 128, 5)
    cfg = quiet(steps=1200, lr=3e-3, lr_warmup_steps=20, log_every=200)
    out = Trainer(model, SyntheticSource(gen, 256), cfg).fit()
    recovery = feature_recovery(model.W_dec, gen.features)
    assert recovery > RECOVERY_BAR, f"feature recovery {recovery:.3f} <= {RECOVERY_BAR}"
    assert out["eval"]["l0"] == pytest.approx(5, abs=0.2)
    assert out["eval"]["fvu"] < 0.3 and out["eval"]["dead_fraction"] < 0.05


def test_c_dec_sweep_minimum_at_true_l0(one_thread):
    """Exactly 4 of 32 orthogonal, correlated features per token: c_dec is lowest for k = 4 (too low an L0
    mixes correlated features, too high a one finds degenerate mixtures)."""
    gen = SyntheticActivations(32, 32, 4, correlation=0.4, exact_l0=True, orthogonal=True, seed=1)
    c = {}
    for k in (2, 4, 8):
        torch.manual_seed(0)
        model = sae.TopKSAE(32, 32, k)
        Trainer(model, SyntheticSource(gen, 256), quiet(steps=600, lr=3e-3, lr_warmup_steps=20)).fit()
        c[k] = metrics.c_dec(model.W_dec)
    assert min(c, key=c.get) == 4, c


class Interrupt(Exception):
    pass


def _run(tmp_path, kill_at=None, resume=False, arch="topk"):
    gen = SyntheticActivations(16, 48, 3, seed=2)
    torch.manual_seed(0)
    if arch == "topk":
        model = sae.TopKSAE(16, 48, 3, aux_k=4)
    else:
        model = sae.ReLUSAE(16, 48, l1_coeff=0.1)
    cfg = quiet(
        steps=60, lr=3e-3, lr_warmup_steps=5, checkpoint_every=20, dead_tokens=128, log_every=1,
        p_end=0.5 if arch == "relu" else None, anneal_every=10, out_dir=str(tmp_path),
    )  # fmt: skip

    def killer(trainer, parts):
        if trainer.step == kill_at:
            raise Interrupt

    trainer = Trainer(model, SyntheticSource(gen, 64, seed=3), cfg, callbacks=[killer])
    try:
        trainer.fit(resume=resume)
    except Interrupt:
        return None
    return trainer


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, arch):
    straight = _run(tmp_path / "a", arch=arch)
    assert _run(tmp_path / "b", kill_at=47, arch=arch) is None  # killed after the checkpoint at step 40
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000000020.pt", "ckpt-000000040.pt"]
    resumed = _run(tmp_path / "b", resume=True, arch=arch)
    assert resumed.step == 60
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resume"
    assert torch.equal(straight.since_fired, resumed.since_fired)
    for key in ("l1_coeff", "p", "act_scale"):
        assert getattr(straight.model, key, None) == getattr(resumed.model, key, None)
    log = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    final = [r for r in log if r.get("step") == 60 and "loss" in r]
    ref = [r for r in straight.history if r.get("step") == 60 and "loss" in r]
    assert final[-1]["loss"] == ref[-1]["loss"]
    if arch == "topk":
        assert any(r.get("aux", 0) > 0 for r in log)  # dead latents fed AuxK
    loaded = sae.load(tmp_path / "b" / "sae")
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded(x), resumed.model.eval()(x), rtol=1e-4, atol=1e-5)


def test_training_practice():
    acts = torch.randn(2048, 12) @ torch.randn(12, 12) * 7.0 + 3.0
    model = sae.TopKSAE(12, 40, 4)
    seen = []
    trainer = Trainer(
        model, TensorSource(acts, 64), quiet(steps=40, lr_warmup_steps=10, grad_clip=0.5),
        callbacks=[lambda t, parts: seen.append(float(parts["grad_norm"]))],
    )  # fmt: skip
    trainer.fit()
    xn = model._normalize(model._rows(acts))[0]
    assert xn.norm(dim=1).mean().item() == pytest.approx(math.sqrt(12), rel=0.05)
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(40), atol=1e-5)
    assert trainer.lr_at(0) == pytest.approx(trainer.cfg.lr / 10)
    assert trainer.lr_at(20) == trainer.cfg.lr and trainer.lr_at(39) < 0.2 * trainer.cfg.lr
    assert len(seen) == 40


def test_geometric_median_init_of_b_dec():
    acts = torch.cat([torch.randn(500, 6) + 5.0, torch.full((50, 6), 500.0)])
    model = sae.TopKSAE(6, 12, 2)
    trainer = Trainer(model, TensorSource(acts, 32), quiet(steps=1, lr=1e-9, normalize=False))
    trainer._init_from_data()
    assert (model.b_dec - 5.0).abs().max() < 0.5


def test_sparsity_warmup_and_p_annealing_keep_the_penalty_continuous():
    gen = SyntheticActivations(16, 32, 3, seed=0)
    model = sae.ReLUSAE(16, 32, l1_coeff=0.2)
    cfg = quiet(steps=100, sparsity_warmup_steps=20, p_end=0.4, anneal_start=0.5, anneal_every=10)
    trainer = Trainer(model, SyntheticSource(gen, 128), cfg)
    coeffs, ps, jumps = [], [], []

    def watch(t, parts):
        coeffs.append(t.model.l1_coeff)
        ps.append(t.model.p)

    trainer.callbacks.append(watch)
    x = gen.sample(512)[0]
    orig = trainer._set_schedules

    def check_continuity():
        before = (trainer.model.p, trainer.model.l1_coeff)
        with torch.no_grad():
            code = trainer.model.encode_sparse(x)
            pen_before = before[1] * trainer.model.penalty(code, before[0])
        orig()
        if trainer.model.p != before[0]:
            with torch.no_grad():
                pen_after = trainer.model.l1_coeff * trainer.model.penalty(code, trainer.model.p)
            jumps.append(pen_after / pen_before)

    trainer._set_schedules = check_continuity
    trainer.fit()
    assert coeffs[0] == pytest.approx(0.2 / 20) and coeffs[19] == pytest.approx(0.2)
    assert ps[49] == 1.0 and ps[-1] == pytest.approx(1 + (0.4 - 1) * 40 / 50)
    assert all(b <= a for a, b in zip(ps, ps[1:]))
    assert len(jumps) == 4 and all(abs(j - 1) < 0.3 for j in jumps), jumps


ARCHS = [
    ("TopKSAE", {"k": 3}),
    ("BatchTopKSAE", {"k": 3}),
    ("JumpReLUSAE", {"l0_coeff": 0.05, "bandwidth": 0.05, "init_threshold": 0.1}),
    ("GatedSAE", {"l1_coeff": 0.05}),
    ("ReLUSAE", {"l1_coeff": 0.05}),
    ("MatryoshkaSAE", {"k": 3, "prefixes": [8, 32]}),
    ("OrderedSAE", {"k": 3}),
]


@pytest.mark.parametrize("name,kw", ARCHS, ids=[a[0] for a in ARCHS])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_architecture_trains(name, kw, precision):
    gen = SyntheticActivations(16, 32, 3, seed=1)
    torch.manual_seed(0)
    model = getattr(sae, name)(16, 32, **kw)
    before = model.W_dec.detach().clone()
    cfg = quiet(steps=30, lr_warmup_steps=5, dead_tokens=500, precision=precision, log_every=10)
    trainer = Trainer(model, SyntheticSource(gen, 64), cfg)
    out = trainer.fit()
    assert model.W_dec.dtype == torch.float32 and not torch.equal(model.W_dec, before)
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    assert all(math.isfinite(v) for v in losses)
    assert out["eval"]["fvu"] < 1.0 and out["eval"]["l0"] > 0
    if name == "BatchTopKSAE":
        assert model.threshold.item() > 0  # the inference threshold was learned


def test_cli_help_and_train(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0 and "--steps" in capsys.readouterr().out
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"steps": 30, "synthetic_d": 8, "synthetic_features": 16, "k": 2}))
    main(["train", "--config", str(config), "--batch-size", "64", "--out-dir", str(tmp_path / "run"),
          "--progress", "false", "--checkpoint-every", "10"])  # fmt: skip
    out = capsys.readouterr().out
    assert "feature recovery" in out and "L0 2.00" in out
    assert (tmp_path / "run" / "sae" / "cfg.json").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) >= 2
    with pytest.raises(SystemExit, match="unknown options"):
        config.write_text(json.dumps({"stepz": 3}))
        main(["train", "--config", str(config)])
    with pytest.raises(SystemExit, match="needs --model"):
        main(["harvest"])


@pytest.mark.parametrize(
    "name,kw",
    [("TopKSAE", {"k": 4}), ("BatchTopKSAE", {"k": 4}), ("JumpReLUSAE", {"init_threshold": 0.5, "bandwidth": 0.1})],
    ids=["TopK+AuxK", "BatchTopK", "JumpReLU"],
)
def test_training_step_never_allocates_batch_by_latents(name, kw):
    """A whole step (forward, AuxK on dead latents, backward, Adam) on the fused kernels stays below B x n."""
    B, d, n = 64, 8, 256  # d < B: parameters, gradients and Adam states [n, d] are smaller than B x n
    model = getattr(sae, name)(d, n, device=DEVICE, **kw)
    source = TensorSource(torch.randn(4096, d, device=DEVICE), B)
    trainer = Trainer(model, source, quiet(steps=1, dead_tokens=1, stats_tokens=256, eval_tokens=256))
    trainer.fit()  # set-up and a first step: latents that did not fire are now dead (AuxK runs)
    x = source.next_batch()
    with kernels.use_backend("triton"), AllocationRecorder() as rec:
        parts = trainer._train_step(x)
    if name == "TopKSAE":
        assert "aux" in parts
    biggest = max(rec.numels)
    assert biggest[0] < B * n, f"{biggest[1]} allocated {biggest[0]} >= B*n = {B * n} elements"


def test_bf16_training_keeps_batch_topk_threshold_in_fp32(one_thread):
    """The threshold EMA moves by less than half a bf16 ulp per step: a bf16 copy of it would never move."""
    gen = SyntheticActivations(16, 32, 3, seed=1)
    torch.manual_seed(0)
    model = sae.BatchTopKSAE(16, 32, k=3)
    seen = []
    trainer = Trainer(model, SyntheticSource(gen, 64), quiet(steps=100, precision="bf16"))
    trainer.callbacks.append(lambda t, parts: seen.append(t.model.threshold.item()))
    trainer.fit()
    assert model.threshold.dtype == torch.float32 and trainer.work.threshold.dtype == torch.float32
    assert len(set(seen[1:])) > 50, "the threshold EMA is stuck"


def test_auto_precision_is_bf16_for_fp32_models_on_cuda():
    """The default compute path on CUDA is bf16 (wgmma kernels, fp32 master weights), never the IEEE fp32 dot."""
    from types import SimpleNamespace

    from sae.trainer import compute_precision

    def model(is_cuda, dtype):
        return SimpleNamespace(parameters=lambda: iter([SimpleNamespace(is_cuda=is_cuda, dtype=dtype)]))

    assert TrainConfig().precision == "auto"
    assert compute_precision("auto", model(True, torch.float32)) == "bf16"
    assert compute_precision("auto", model(True, torch.bfloat16)) == "fp32"  # already low precision: as built
    assert compute_precision("auto", model(False, torch.float32)) == "fp32"
    assert compute_precision("fp32", model(True, torch.float32)) == "fp32"
