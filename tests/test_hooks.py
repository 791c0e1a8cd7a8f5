"""Splicing an SAE into a model: read features, replace with the reconstruction, steer latents."""

import pytest
import torch
from helpers import assert_close
from torch import nn

import sae

D, N = 16, 48


class Block(nn.Module):
    """Returns a tuple, as Hugging Face blocks do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return (x + torch.tanh(self.lin(x)), None)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 30)

    def forward(self, tokens, replace_first=None):
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h = block(h)[0]
            if i == 0 and replace_first is not None:
                h = replace_first(h)
        return self.head(h)


def make_sae():
    model = sae.TopKSAE(D, N, 6)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        model.b_dec.normal_(0, 0.2)
    return model


def test_read_replace_and_detach():
    model, s = Tiny(), make_sae()
    tokens = torch.randint(0, 30, (3, 7))
    with torch.no_grad():
        clean = model(tokens)
        with sae.attach(model.blocks[0], s) as spliced:
            read = model(tokens)
        assert torch.equal(read, clean)  # reading leaves the model alone
        assert len(spliced.codes) == 1 and spliced.codes[0].values.shape == (21, 6)
        acts = model.blocks[0](model.embed(tokens))[0]
        assert torch.equal(spliced.codes[0].indices, s.encode_sparse(acts).indices)
        with sae.attach(model.blocks[0], s, replace=True, keep_codes=False) as spliced:
            replaced = model(tokens)
        assert spliced.codes == []
        assert torch.allclose(replaced, model(tokens, replace_first=s), atol=1e-6)
        assert not torch.allclose(replaced, clean)
        with sae.attach(model.blocks[0], s, replace=True, error_term=True):
            assert torch.allclose(model(tokens), clean, atol=1e-6)  # x_hat + error = x
        assert torch.equal(model(tokens), clean)  # hooks removed on exit


@pytest.mark.parametrize("sae_cls", ["topk", "relu"])
def test_steering_clamp_and_add(sae_cls):
    model = Tiny()
    s = make_sae() if sae_cls == "topk" else sae.ReLUSAE(D, N)
    tokens = torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        acts = model.blocks[0](model.embed(tokens))[0]
        f = s.encode(acts)
        top = int(f.reshape(-1, N).sum(0).argmax())  # an active latent to clamp
        edited = f.clone()
        edited[..., top] = 4.0
        edited[..., 7] += 2.5
        want = acts + (edited - f) @ s.W_dec
        seen = []
        with sae.attach(model.blocks[0], s, clamp={top: 4.0}, add={7: 2.5}, error_term=True):
            handle = model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o[0]))
            model(tokens)
            handle.remove()
    assert_close(seen[0], want, torch.float32, "steered activation")
    with sae.attach(model.blocks[0], s, clamp={top: 0.0}) as spliced, torch.no_grad():
        model(tokens)
    assert spliced.replace  # steering replaces the activation
    with pytest.raises(ValueError, match=r"clamp: latents \[48\]"):
        sae.attach(model.blocks[0], s, clamp={N: 1.0})
    with pytest.raises(TypeError, match="sae must be an SAE"):
        sae.attach(model.blocks[0], nn.Linear(2, 2))


def test_transformers_block():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    s = make_sae()
    tokens = torch.randint(0, 40, (2, 6))
    block = model.transformer.h[0]
    with torch.no_grad():
        clean = model(tokens, labels=tokens)
        with sae.attach(block, s) as spliced:
            assert torch.equal(model(tokens).logits, clean.logits)
        assert spliced.codes[0].values.shape == (12, 6)
        with sae.attach(block, s, replace=True):
            spliced_loss = model(tokens, labels=tokens).loss  # loss recovered: clean vs spliced
        with sae.attach(block, s, replace=True, error_term=True):
            assert torch.allclose(model(tokens).logits, clean.logits, atol=1e-5)
    assert torch.isfinite(spliced_loss) and spliced_loss != clean.loss
