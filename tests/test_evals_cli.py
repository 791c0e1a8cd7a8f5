"""`python -m sae eval` on a CLI-trained SAE (the `make demo` recipe, smaller) and on activations harvested from
text (token files, CE loss, token strings, top logits); the harvest's token files; every flag explained."""

import json

import numpy as np
import pytest
import torch
from helpers import word_tokenizer

import sae
from sae.__main__ import build_parser, main
from sae.harvest import TOKEN_FIELDS, HarvestedActivations, tokens_path

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["eval", "l0-sweep"])
def test_every_flag_has_help(command):
    actions = [a for a in build_parser()[1][command]._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 10
    for a in actions:
        text = (a.help or "").split("(default")[0].strip()
        assert len(text) > 8, f"{a.option_strings[0]} has no help text"


def test_eval_demo_sae(tmp_path, one_thread, capsys):
    """Train as `make demo` does (smaller), then evaluate: report, plots and dashboard; the extra inputs come
    from .npy, .pt and .safetensors files."""
    synthetic = ["--synthetic-d", "16", "--synthetic-features", "24", "--synthetic-l0", "3"]
    main(["train", *synthetic, "--k", "3", "--batch-size", "128", "--steps", "150", "--log-every", "50",
          "--checkpoint-every", "0", "--progress", "false", "--out-dir", str(tmp_path / "demo")])  # fmt: skip
    model = sae.load(tmp_path / "demo" / "sae")
    np.save(tmp_path / "emb.npy", np.random.default_rng(0).normal(size=(1024, 5)).astype(np.float32))
    torch.save(torch.rand(1024, 3) < 0.2, tmp_path / "labels.pt")
    from safetensors.torch import save_file

    save_file({"d": torch.randn(4, 16)}, tmp_path / "dirs.safetensors")
    out = tmp_path / "eval"
    main(["eval", str(tmp_path / "demo" / "sae"), *synthetic, "--max-tokens", "1024", "--latents", "6",
          "--examples", "3", "--out-dir", str(out), "--progress", "false", "--compare", str(tmp_path / "demo" / "sae"),
          "--embeddings", str(tmp_path / "emb.npy")])  # fmt: skip
    assert "coverage" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rec = report["reconstruction"]
    assert rec["tokens"] == 1024 and rec["l0"] == pytest.approx(3, abs=0.05) and 0 < rec["fvu"] < 1
    assert len(report["coverage"]["f1"]) == 24 and 0 < report["coverage"]["coverage"] <= 1  # the true features
    assert report["cone"]["sizes"] == [1, 2, 4, 8, 16, 32] and len(report["cone"]["cos"]) == 24
    assert report["consistency"]["mmcs"] == pytest.approx(1, abs=1e-5)  # compared with itself
    assert len(report["monosemanticity"]["per_latent"]) == model.d_sae
    for name in ("density.png", "l0.png", "coverage.png", "cone.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert "| fvu |" in (out / "report.md").read_text()
    latents = json.loads((out / "latents.json").read_text())
    assert [r["latent"] for r in latents["latents"]] == list(range(6))
    assert 'id="search"' in (out / "dashboard.html").read_text()
    main(["eval", str(tmp_path / "demo" / "sae"), *synthetic, "--max-tokens", "512", "--out-dir", str(out),
          "--progress", "false", "--labels", str(tmp_path / "labels.pt"),
          "--directions", str(tmp_path / "dirs.safetensors")])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert len(report["coverage"]["f1"]) == 3 and len(report["cone"]["cos"]) == 4
    with pytest.raises(SystemExit, match="--labels has 1024 rows, fewer than the 2048"):
        main(["eval", str(tmp_path / "demo" / "sae"), *synthetic, "--max-tokens", "2048", "--out-dir", str(out),
              "--progress", "false", "--labels", str(tmp_path / "labels.pt")])  # fmt: skip


@pytest.fixture
def text_model(tmp_path):
    """A GPT-2 language model and a word-level tokenizer saved locally (no hub), and a text file."""
    transformers = pytest.importorskip("transformers")
    words = [f"w{i}" for i in range(40)]
    fast = word_tokenizer(words, eos_token="[EOS]")
    config = transformers.GPT2Config(
        vocab_size=48, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1
    )
    folder = tmp_path / "lm"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(words[(5 * j + 3 * i) % 40] for i in range(60)) for j in range(6)))
    return folder, text, fast


def test_harvest_keeps_tokens_and_eval_reads_them(tmp_path, text_model, one_thread):
    folder, text, tokenizer = text_model
    acts_dir = tmp_path / "acts"
    main(["harvest", "--model", str(folder), "--module", "h.0", "--text", str(text), "--out-dir", str(acts_dir),
          "--context", "8", "--batch-size", "4", "--shard-tokens", "40", "--max-tokens", "300"])  # fmt: skip
    shards = sorted(acts_dir.glob("shard-*.safetensors"))
    assert len(shards) == 8 and all(tokens_path(p).is_file() for p in shards)
    with np.load(tokens_path(shards[0])) as f:
        assert {k: f[k].dtype for k in TOKEN_FIELDS} == TOKEN_FIELDS
    acts = HarvestedActivations(acts_dir, batch_size=32)
    assert len(acts) == 300 and acts.tokens["position"].tolist() == [i % 8 for i in range(300)]
    assert acts.tokens["sequence"].tolist() == [i // 8 for i in range(300)]
    rows = torch.cat(list(acts))
    assert rows.shape == (300, 16) and torch.equal(acts.rows(torch.tensor([299, 0, 41])), rows[[299, 0, 41]])
    import transformers  # the token files say what produced each row: the windows they describe give the rows

    ids = acts.tokens["token_ids"][:296].reshape(37, 8)
    lm = transformers.GPT2Model.from_pretrained(folder)
    torch.testing.assert_close(sae.harvest.Harvester(lm, "h.0")(ids), rows[:296])
    words = set(tokenizer.convert_ids_to_tokens(acts.tokens["token_ids"].tolist()))
    assert words <= set(text.read_text().split()) | {"[EOS]"}

    torch.manual_seed(0)
    model = sae.TopKSAE(16, 32, 3)
    sae.save(model, tmp_path / "sae")
    out = tmp_path / "eval"
    main(["eval", str(tmp_path / "sae"), "--data", str(acts_dir), "--model", str(folder), "--module", "h.0",
          "--text", str(text), "--context", "8", "--windows", "6", "--latents", "4", "--examples", "2",
          "--out-dir", str(out), "--progress", "false"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["tokens"] == 6 * 7 and report["fidelity"]["ce_clean"] > 0
    assert "coverage" not in report and "cone" not in report
    records = json.loads((out / "latents.json").read_text())["latents"]
    ex = next(r for r in records if r["examples"])
    assert ex["examples"][0]["tokens"][ex["examples"][0]["max_index"]].startswith("w")  # decoded by the tokenizer
    assert len(ex["top_logits"]) == 10 and ex["top_logits"][0]["value"] >= ex["top_logits"][-1]["value"]
