"""Text in from Hugging Face `datasets` (small local files the tests write), context windows with SAELens's BOS
rule, and `python -m sae harvest --dataset ...` end to end on a tiny local GPT-2."""

import json

import pytest
import torch
from helpers import word_tokenizer

import sae
import sae.corpus as corpus

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DOCS = [f"doc {i} " + " ".join(f"w{(5 * i + j) % 40}" for j in range(3 + i % 7)) for i in range(30)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


class IntTokenizer:
    """'3 4 5' -> [3, 4, 5]; BOS is 0."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert not add_special_tokens
        return {"input_ids": [int(w) for w in text.split()]}


@pytest.mark.parametrize(
    "docs, windows",
    [
        # window BOS, separator BOS between documents, none where a document starts with BOS, long documents
        # go on after the next window's BOS, the partial last window is dropped
        (["1 2 3", "4 5", "0 6 7 8 9 10 11", "12"], [[0, 1, 2, 3], [0, 4, 5, 0], [0, 6, 7, 8], [0, 9, 10, 11]]),
        (["1 2", "3 4 5"], [[0, 1, 2, 0], [0, 3, 4, 5]]),  # a separator that fills a window
        (["0 1 2 3 0 4 5 6"], [[0, 1, 2, 3], [0, 4, 5, 6]]),  # a window whose next token is BOS gets no second
    ],
)
def test_context_windows_follow_saelens(docs, windows):
    assert list(corpus.context_windows(docs, IntTokenizer(), 4)) == windows
    plain = [int(w) for d in docs for w in d.split()]
    got = list(corpus.context_windows(docs, IntTokenizer(), 4, prepend_bos=False))
    assert [t for w in got for t in w] == plain[: len(got) * 4]


def tiny_tokenizer():
    words = [f"w{i}" for i in range(40)] + ["doc"] + [str(i) for i in range(30)]
    specials = ("[UNK]", "[BOS]", "[EOS]")
    tokens = {"bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
    return word_tokenizer(words, specials, model_max_length=8, **tokens)


def test_token_batch_parts_take_every_nth_document():
    docs = [f"{3 * i + 1} {3 * i + 2} {3 * i + 3}" for i in range(7)]  # each document one window of 4 with BOS
    whole = corpus.TokenBatches(lambda: docs, IntTokenizer(), context=4, batch_size=1)
    parts = [list(whole.part(g, 3)) for g in range(3)]
    assert [[b.tolist() for b in p] for p in parts] == [[b.tolist() for b in list(whole)[g::3]] for g in range(3)]
    with pytest.raises(ValueError, match="group must be in"):
        whole.part(3, 3)


def test_hf_tokenizer_windows_start_with_bos_and_keep_every_token():
    tok = tiny_tokenizer()
    windows = list(corpus.context_windows(DOCS, tok, 16))
    assert len(windows) > 5 and all(len(w) == 16 and w[0] == tok.bos_token_id for w in windows)
    stream = [t for w in windows for t in w if t != tok.bos_token_id]
    every = [t for d in DOCS for t in tok(d, add_special_tokens=False)["input_ids"]]
    assert stream == every[: len(stream)] and len(every) - len(stream) < 16
    batches = list(corpus.window_batches(windows, 3))
    assert len(batches) == len(windows) // 3 and batches[0].shape == (3, 16) and batches[0].dtype == torch.int64


def write_files(folder):
    """The same rows as parquet, jsonl, csv, an arrow file and a save_to_disk folder."""
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    ds.to_parquet(str(folder / "d.parquet"))
    ds.to_json(str(folder / "d.jsonl"))
    ds.to_csv(str(folder / "d.csv"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(str(folder / "saved"))
    (arrow,) = (folder / "saved" / "train").glob("*.arrow")
    return ["d.parquet", "d.jsonl", "d.csv", arrow.relative_to(folder), "saved"]


def test_local_files_whole_streamed_and_in_parts(tmp_path):
    for name in write_files(tmp_path):
        path = str(tmp_path / name)
        assert list(corpus.texts(corpus.load_dataset(path))) == DOCS, name
        assert list(corpus.texts(corpus.load_dataset(path, streaming=True))) == DOCS, name
        parts = [list(corpus.texts(corpus.load_dataset(path, part=(i, 3)))) for i in range(3)]
        assert sorted(sum(parts, [])) == sorted(DOCS) and all(parts), name  # disjoint, together all rows
    assert list(corpus.texts(corpus.load_dataset(tmp_path / "saved", split="validation"))) == DOCS[:4]


def test_dataset_errors_name_the_argument(tmp_path):
    write_files(tmp_path)
    with pytest.raises(ValueError, match=r"column='body' is not a column of the dataset; it has \['text', 'n'\]"):
        next(corpus.texts(corpus.load_dataset(tmp_path / "d.parquet"), "body"))
    with pytest.raises(ValueError, match=r"column='body' .* it has \['text', 'n'\]"):
        next(corpus.texts(corpus.load_dataset(tmp_path / "d.jsonl", streaming=True), "body"))
    with pytest.raises(ValueError, match=r"split='test' is not in .* it has \['train', 'validation'\]"):
        corpus.load_dataset(tmp_path / "saved", split="test")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"unknown file type '.xml'"):
        corpus.load_dataset(tmp_path / "d.xml")
    with pytest.raises(ValueError, match=r"part must be"):
        corpus.load_dataset(tmp_path / "d.parquet", part=(2, 2))


@pytest.fixture
def tiny_gpt2(tmp_path):
    """A tiny GPT-2 with the word-level tokenizer (BOS [BOS]) saved locally, and a parquet file of DOCS."""
    config = transformers.GPT2Config(vocab_size=80, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
    return tmp_path / "model", tmp_path / "docs.parquet"


def test_cli_harvest_from_a_dataset(tiny_gpt2, tmp_path):
    from sae.__main__ import main
    from sae.data import ShardSource
    from sae.harvest import Harvester

    model, data = tiny_gpt2
    out = tmp_path / "acts"
    args = ["harvest", "--model", str(model), "--module", "h.0", "--dataset", str(data), "--column", "body"]
    main([*args, "--context", "16", "--batch-size", "2", "--shard-tokens", "64", "--out-dir", str(out)])
    src = ShardSource(out, 8)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    windows = list(corpus.context_windows(DOCS, tok, 16))
    windows = windows[: len(windows) // 2 * 2]  # whole batches of 2
    assert src.d_in == 16 and src.tokens == len(windows) * 16
    lm = transformers.AutoModel.from_pretrained(model)
    expected = Harvester(lm, "h.0")(torch.tensor(windows))
    got = torch.cat([torch.from_numpy(a.copy()) for a, _ in src.shards])
    torch.testing.assert_close(got, expected)


def test_cli_harvest_needs_text_or_dataset(tiny_gpt2):
    from sae.__main__ import main

    with pytest.raises(SystemExit, match="harvest needs --text or --dataset"):
        main(["harvest", "--model", str(tiny_gpt2[0]), "--module", "h.0"])


def test_live_source_resumes_exactly_and_wraps_epochs(tiny_gpt2):
    """HarvestSource over a re-iterable of token batches read from a dataset (not a list)."""
    from sae.harvest import Harvester, HarvestSource

    model, data = tiny_gpt2
    tok = transformers.AutoTokenizer.from_pretrained(model)
    lm = transformers.AutoModel.from_pretrained(model)
    ds = corpus.load_dataset(data, streaming=True)
    batches = corpus.TokenBatches(lambda: corpus.texts(ds, "body"), tok, context=16, batch_size=2)
    n_batches = len(list(batches))
    harvester = Harvester(lm, "h.1", target_module="h.1.mlp")

    def source():
        return HarvestSource(harvester, batches, 32, buffer_tokens=48, seed=2)

    a = source()
    assert (a.d_in, a.d_out) == (16, 16)
    epoch = torch.cat([a.next_batch() for _ in range(n_batches)])  # one epoch of rows, shuffled
    direct = torch.cat([harvester(ids) for ids in batches])
    key = lambda t: sorted(map(tuple, t[:, :3].tolist()))
    assert epoch.shape == (n_batches * 32, 32) and key(epoch) == key(direct)  # every pair once, pairs intact
    b = source()
    [b.next_batch() for _ in range(3)]
    state, expected = b.state_dict(), torch.cat([b.next_batch() for _ in range(n_batches * 2)])  # past the epoch
    assert b.epoch >= 1
    c = source()
    c.load_state_dict(state)
    torch.testing.assert_close(torch.cat([c.next_batch() for _ in range(n_batches * 2)]), expected)


def test_cli_transcoder_harvest_then_train(tiny_gpt2, tmp_path):
    """harvest --target-module writes targets/ beside the inputs; train reads the pairs, d_out from the target."""
    from sae.__main__ import main
    from sae.data import ShardSource
    from sae.harvest import Harvester

    model, data = tiny_gpt2
    out = tmp_path / "acts"
    main(["harvest", "--model", str(model), "--module", "h.0.ln_2", "--target-module", "h.0.mlp", "--dataset",
          str(data), "--column", "body", "--context", "16", "--batch-size", "2", "--shard-tokens", "100",
          "--format", "npy", "--out-dir", str(out)])  # fmt: skip
    assert sorted(p.name for p in (out / "targets").iterdir()) == sorted(p.name for p in out.glob("*.npy"))
    src = ShardSource(out, 8)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    windows = list(corpus.context_windows(DOCS, tok, 16))
    lm = transformers.AutoModel.from_pretrained(model)
    expected = Harvester(lm, "h.0.ln_2", target_module="h.0.mlp")(torch.tensor(windows[: len(windows) // 2 * 2]))
    got = torch.cat([src._rows(s, slice(None)) for s in range(len(src.shards))])
    torch.testing.assert_close(got, expected)
    runs = tmp_path / "runs"
    for arch, fmt in (("relu", "saelens"), ("topk", "sparsify")):
        main(["train", "--data", str(out), "--arch", arch, "--skip", "true", "--steps", "15", "--batch-size", "32",
              "--expansion", "2", "--k", "4", "--progress", "false", "--export-format", fmt,
              "--out-dir", str(runs / arch)])  # fmt: skip
        cfg = json.loads((runs / arch / "sae" / "cfg.json").read_text())
        if fmt == "saelens":
            assert cfg["architecture"] == "skip_transcoder" and cfg["apply_b_dec_to_input"] is False
        else:  # sparsify's TopK transcoder
            assert cfg["transcode"] and cfg["skip_connection"] and (runs / arch / "sae" / "sae.safetensors").is_file()
        assert sae.load(runs / arch / "sae").W_skip is not None


def test_cli_train_from_a_running_model(tiny_gpt2, tmp_path):
    from sae.__main__ import main

    model, data = tiny_gpt2
    out = tmp_path / "run"
    base = ["train", "--model", str(model), "--module", "h.1", "--dataset", str(data), "--column", "body",
            "--context", "16", "--model-batch-size", "2", "--batch-size", "32", "--buffer-tokens", "64",
            "--steps", "12", "--expansion", "2", "--k", "4", "--progress", "false", "--log-every", "4"]  # fmt: skip
    main([*base, "--out-dir", str(out)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [4, 8, 12] and log[-1]["eval"]["fvu"] < 1.5
    model_out = sae.load(out / "sae")
    assert (model_out.d_in, model_out.d_out) == (16, 16) and model_out.apply_b_dec_to_input
    main([*base, "--target-module", "h.1.mlp", "--streaming", "true", "--out-dir", str(tmp_path / "tc")])
    assert not sae.load(tmp_path / "tc" / "sae").apply_b_dec_to_input  # a transcoder: no input centering
