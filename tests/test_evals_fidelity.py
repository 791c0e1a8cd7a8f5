"""CE loss recovered and KL through `sae.attach`, on a tiny GPT-2 first trained on a synthetic token task (next
token = a fixed permutation of the current one), so that ablating its residual stream costs several nats."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sae
from sae import evals
from sae.trainer import TrainConfig, Trainer

V, T = 24, 12  # vocabulary, window
MODULE = "transformer.h.0"  # the residual stream after the first block


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    perm = torch.randperm(V)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(100):
        ids = sequences(perm, 16)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.perm = perm
    return model


def sequences(perm, n):
    """n windows following the permutation from random starts."""
    ids = torch.zeros(n, T, dtype=torch.long)
    ids[:, 0] = torch.randint(V, (n,))
    for t in range(1, T):
        ids[:, t] = perm[ids[:, t - 1]]
    return ids


def acts_of(lm, ids):
    return sae.harvest.Harvester(lm, MODULE)(ids)


def twin(lm, model, ids):
    """float64 CE losses and KL with the splice and the ablations done by hand: a dense TopK SAE and explicit
    -log softmax at the targets."""
    lm = copy.deepcopy(lm).double()
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))

    def sae64(x):
        z = torch.relu((x - b_dec) @ W_enc.T + b_enc)
        top = z.topk(model.k, dim=-1)
        f = torch.zeros_like(z).scatter(-1, top.indices, top.values)
        return f @ W_dec + b_dec

    mean = acts_of(lm, ids).double().mean(0)
    edits = {"clean": None, "spliced": sae64, "zero": torch.zeros_like, "mean": lambda h: mean.expand_as(h)}
    logp = {}
    for name, edit in edits.items():
        hook = None
        if edit is not None:
            hook = lm.get_submodule(MODULE).register_forward_hook(
                lambda m, i, o, e=edit: e(o) if torch.is_tensor(o) else (e(o[0]), *o[1:])
            )
        with torch.no_grad():
            logp[name] = F.log_softmax(lm(ids).logits[:, :-1].double(), -1)
        if hook is not None:
            hook.remove()
    target = ids[:, 1:]
    ce = {k: -v.gather(-1, target[..., None]).mean().item() for k, v in logp.items()}
    p = logp["clean"].exp()
    kl = (p * (logp["clean"] - logp["spliced"])).sum(-1).mean().item()
    return ce, kl


def test_ce_loss_recovered_matches_twin(lm):
    ids = sequences(lm.perm, 24)
    torch.manual_seed(1)
    model = sae.TopKSAE(16, 48, 4)
    x = acts_of(lm, sequences(lm.perm, 256))
    Trainer(model, sae.data.TensorSource(x, 128), TrainConfig(steps=150, normalize=False, progress=False)).fit()
    out = evals.ce_loss_recovered(lm, MODULE, model.eval(), ids, batch_size=10)
    ce, kl = twin(lm, model, ids)
    for k in ("clean", "spliced", "zero", "mean"):
        assert out[f"ce_{k}"] == pytest.approx(ce[k], rel=1e-4), k
    assert out["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert out["ce_zero"] - out["ce_clean"] > 1.0  # the trained model needs its residual stream
    gap = ce["zero"] - ce["clean"]
    assert out["ce_recovered_zero"] == pytest.approx((ce["zero"] - ce["spliced"]) / gap, rel=1e-3)
    assert 0 < out["ce_recovered_zero"] <= 1 and out["tokens"] == 24 * (T - 1)


def test_ce_loss_recovered_known_answers(lm):
    """An SAE that reconstructs exactly recovers all the loss (KL 0); one that outputs zeros recovers none of the
    zero-ablation gap. The module may be named as in the base model ("h.0", as a harvest names it)."""
    d = 16
    exact = sae.ReLUSAE(d, 2 * d, apply_b_dec_to_input=False)  # f = [relu(x), relu(-x)], x_hat = x
    with torch.no_grad():
        eye = torch.eye(d)
        exact.W_enc.copy_(torch.cat([eye, -eye]))
        exact.W_dec.copy_(torch.cat([eye, -eye]))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    ids = sequences(lm.perm, 16)
    out = evals.ce_loss_recovered(lm, "h.0", exact, ids)
    assert out["ce_recovered_zero"] == pytest.approx(1, abs=1e-5) and out["ce_recovered_mean"] == pytest.approx(
        1, abs=1e-5
    )
    assert out["kl"] == pytest.approx(0, abs=1e-6)
    silent = copy.deepcopy(exact)
    with torch.no_grad():
        silent.W_dec.zero_()
    out = evals.ce_loss_recovered(lm, MODULE, silent, [ids[:7], ids[7:]])
    assert out["ce_recovered_zero"] == pytest.approx(0, abs=1e-6) and out["kl"] == pytest.approx(out["kl_zero"])
    with pytest.raises(ValueError, match="not a module"):
        evals.ce_loss_recovered(lm, "h.9", exact, ids)
