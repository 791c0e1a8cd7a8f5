"""Top-activating examples against a dense float64 twin, the JSON layout for explainers, and the HTML dashboard
driven in a real headless browser (Debian's chromium + chromium-driver through selenium; under CI=true a
missing browser fails instead of skipping)."""

import json
import os
import shutil

import pytest
import torch

import sae
from sae import evals

N, D, NL = 120, 8, 20


def model_and_acts():
    model = sae.TopKSAE(D, NL, 3).eval()
    with torch.no_grad():
        model.b_enc.normal_(-0.2, 0.3)
    x = torch.randn(N, D)
    x[50] = x[10]  # equal activations: the earlier row comes first
    return model, x


def dense(model, x):
    with torch.no_grad():
        return model.encode_sparse(x).to_dense(model.d_sae).double()


def token_info():
    """Windows of 16 tokens; row r is position r % 16 of window r // 16."""
    rows = torch.arange(N)
    return {"token_ids": (rows * 7) % 50, "sequence": rows // 16, "position": rows % 16}


def test_top_activations_match_twin():
    model, x = model_and_acts()
    out = evals.top_activations(model, [x[:33], x[33:34], x[34:]], n_examples=4, batch_size=1000)
    F = dense(model, x)
    for i in range(NL):
        order = torch.sort(F[:, i], descending=True, stable=True)
        fired = int((F[:, i] > 0).sum())
        m = min(4, fired)
        assert out["rows"][i, :m].tolist() == order.indices[:m].tolist(), i
        assert torch.allclose(out["values"][i, :m].double(), order.values[:m], rtol=1e-6)
        assert (out["rows"][i, m:] == -1).all() and torch.isinf(out["values"][i, m:]).all()
    assert out["counts"].tolist() == (F > 0).sum(0).tolist() and out["tokens"] == N


class TinyLM(torch.nn.Module):
    """Only what latent_records reads from a language model: its output embeddings [V, d]."""

    def __init__(self, V=30):
        super().__init__()
        self.head = torch.nn.Linear(D, V, bias=False)

    def get_output_embeddings(self):
        return self.head


def test_latent_records_layout():
    model, x = model_and_acts()
    tokens, lm = token_info(), TinyLM()
    latents = [0, 3, 7, 19]
    data = evals.latent_records(
        model, x, latents=latents, n_examples=3, before=4, after=2, tokens=tokens, lm=lm, n_logits=5,
        decode=lambda ids: [f"t{i}" for i in ids], batch_size=16,
    )  # fmt: skip
    assert data["format"] == "sae-kernels/latents-1" and data["tokens"] == N and data["d_sae"] == NL
    assert [r["latent"] for r in data["latents"]] == latents
    json.dumps(data)  # plain JSON
    F = dense(model, x)
    logits = model.W_dec.detach().double() @ lm.head.weight.detach().double().T
    for rec in data["latents"]:
        i = rec["latent"]
        assert rec["density"] == pytest.approx((F[:, i] > 0).double().mean().item())
        assert rec["max_activation"] == pytest.approx(F[:, i].max().item(), rel=1e-6)
        assert [t["id"] for t in rec["top_logits"]] == logits[i].topk(5).indices.tolist()
        assert [t["id"] for t in rec["bottom_logits"]] == logits[i].topk(5, largest=False).indices.tolist()
        for ex in rec["examples"]:
            r = ex["row"]
            ctx = [c for c in range(r - 4, r + 3) if 0 <= c < N and c // 16 == r // 16]  # inside the window only
            assert ex["token_ids"] == [(c * 7) % 50 for c in ctx] and ex["tokens"] == [f"t{(c * 7) % 50}" for c in ctx]
            assert ex["activations"] == pytest.approx(F[ctx, i].tolist(), rel=1e-6, abs=1e-7)
            assert ctx[ex["max_index"]] == r and ex["position"] == r % 16 and ex["sequence"] == r // 16
            assert ex["activation"] == pytest.approx(F[r, i].item(), rel=1e-6)
    plain = evals.latent_records(model, x, latents=[1], n_examples=2)  # no token files: the row alone
    assert all(ex["tokens"] == [f"#{ex['row']}"] and ex["max_index"] == 0 for ex in plain["latents"][0]["examples"])
    with pytest.raises(ValueError, match="latents"):
        evals.latent_records(model, x, latents=[NL])
    with pytest.raises(TypeError, match="random access"):
        evals.latent_records(model, iter([x]))


@pytest.fixture
def browser():
    """Headless chromium through chromedriver; skipped without them, except under CI=true, where it fails."""
    need = "Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium"
    miss = pytest.fail if os.environ.get("CI", "").lower() == "true" else pytest.skip
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        miss(f"the dashboard test needs {need}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        miss(f"the dashboard test needs {need}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def test_dashboard_search_shows_only_the_matching_card(tmp_path, browser):
    from selenium.webdriver.common.by import By

    model, x = model_and_acts()
    data = evals.latent_records(model, x, latents=range(12), n_examples=2, tokens=token_info())
    data["latents"][3]["examples"][0]["tokens"][0] = "<b>&"  # token text is escaped, not markup
    _, page = evals.write_dashboard(data, tmp_path)
    browser.get(page.as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert len(cards) == 12 and all(c.is_displayed() for c in cards)
    box = browser.find_element(By.ID, "search")
    for query, expected in (("1", ["1"]), ("10", ["10"]), ("3", ["3"]), ("999", []), ("", [str(i) for i in range(12)])):
        box.clear()
        box.send_keys(query) if query else browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)
        shown = [c.get_attribute("data-latent") for c in cards if c.is_displayed()]
        assert shown == expected, (query, shown)
        assert browser.find_element(By.ID, "status").text == f"{len(expected)} of 12 latents"
    card = browser.find_element(By.ID, "latent-3")
    assert "<b>&" in card.text and not card.find_elements(By.CSS_SELECTOR, "b")
