import numpy as np
import pytest
import torch
from torch import nn

from sae.data import ShardSource, TensorSource, open_shard, write_shard
from sae.harvest import Harvester, HarvestSource, harvest_to_shards, token_batches


def take(source, n):
    return torch.cat([source.next_batch() for _ in range(n)])


def test_tensor_source_epochs_and_resume():
    acts = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)
    src = TensorSource(acts, 7, seed=1)
    rows = take(src, 8)  # 7 batches of 7 = 49 rows, then one that wraps into the next epoch
    first = rows[:49, 0].long().tolist()
    assert len(set(first)) == 49 and first != sorted(first)
    resumed = TensorSource(acts, 7, seed=1)
    take(resumed, 3)
    state = resumed.state_dict()
    again = TensorSource(acts, 7, seed=1)
    again.load_state_dict(state)
    torch.testing.assert_close(take(again, 9), take(resumed, 9))
    assert src.sample(10).shape == (10, 3)
    with pytest.raises(ValueError, match="acts must be"):
        TensorSource(torch.zeros(5), 2)


def write_folder(tmp_path, sizes, d=5, suffixes=(".npy", ".safetensors"), dtype=torch.float32):
    rows, start = [], 0
    for i, n in enumerate(sizes):
        a = torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, d).to(dtype)
        write_shard(tmp_path / f"s{i}{suffixes[i % len(suffixes)]}", a)
        rows.append(a)
        start += n
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shard_formats_memory_mapped(tmp_path, dtype):
    a = torch.randn(11, 4).to(dtype)
    write_shard(tmp_path / "a.safetensors", a)
    arr, bf16 = open_shard(tmp_path / "a.safetensors")
    assert isinstance(arr, np.memmap) and bf16 == (dtype == torch.bfloat16)
    src = ShardSource(tmp_path, 11, dtype=dtype, seed=0)
    assert torch.equal(src.next_batch().sort(0).values, a.sort(0).values)
    if dtype != torch.bfloat16:
        write_shard(tmp_path / "b.npy", a)
        assert isinstance(open_shard(tmp_path / "b.npy")[0], np.memmap)


def test_shard_source_shuffles_across_shards_and_resumes(tmp_path):
    full = write_folder(tmp_path, [40, 23, 61, 5])
    src = ShardSource(tmp_path, 16, buffer_tokens=32, chunk_tokens=8, seed=2)
    assert src.d_in == 5 and src.tokens == 129
    epoch = take(src, 129 // 16 + 1)[:129, 0]
    assert sorted(epoch.long().tolist()) == list(range(129))  # each row once per epoch
    first_batch_shards = set((epoch[:16] // 40).long().tolist())
    assert len(first_batch_shards) > 1  # a batch mixes shards
    src2 = ShardSource(tmp_path, 16, buffer_tokens=32, chunk_tokens=8, seed=2)
    take(src2, 11)  # into the second epoch
    state = src2.state_dict()
    expected = take(src2, 12)
    src3 = ShardSource(tmp_path, 16, buffer_tokens=32, chunk_tokens=8, seed=2)
    src3.load_state_dict(state)
    assert torch.equal(take(src3, 12), expected)
    sample = src.sample(50)
    assert sample.shape == (50, 5) and set(sample[:, 0].long().tolist()) <= set(range(129))
    assert torch.equal(full[sample[:, 0].long()], sample)


@pytest.mark.parametrize("groups", [2, 4])
def test_shard_source_parts_read_their_rows_alone(tmp_path, groups):
    """G data groups' parts give the whole source's batches, across windows and epochs, and after a resume;
    each part reads only its rows (1 / G of the data), and its position is the whole source's."""
    write_folder(tmp_path, [40, 23, 61, 5])
    whole = ShardSource(tmp_path, 16, buffer_tokens=32, chunk_tokens=8, seed=2)
    parts = [ShardSource(tmp_path, 16, buffer_tokens=32, chunk_tokens=8, seed=2).part(g, groups) for g in range(groups)]
    read = [0] * groups
    for g, p in enumerate(parts):
        rows = p._rows
        p._rows = lambda s, idx, rows=rows, g=g: read.__setitem__(g, read[g] + len(rows(s, idx))) or rows(s, idx)
    for _ in range(20):  # 320 rows: past two epochs of 129
        assert torch.equal(whole.next_batch(), torch.cat([p.next_batch() for p in parts]))
    assert read == [20 * 16 // groups] * groups and parts[0].batch_size == 16 // groups
    assert all(p.state_dict() == whole.state_dict() for p in parts)
    resumed = ShardSource(tmp_path, 16, buffer_tokens=32, chunk_tokens=8, seed=2).part(groups - 1, groups)
    resumed.load_state_dict(whole.state_dict())
    assert torch.equal(resumed.next_batch(), whole.next_batch()[-16 // groups :])
    with pytest.raises(ValueError, match="divisible by the data groups"):
        whole.part(0, 3)
    with pytest.raises(ValueError, match="group must be in"):
        whole.part(groups, groups)


def test_shard_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        ShardSource(tmp_path, 4)
    write_shard(tmp_path / "a.npy", torch.zeros(3, 4))
    write_shard(tmp_path / "b.npy", torch.zeros(3, 5))
    with pytest.raises(ValueError, match="disagree on d_in"):
        ShardSource(tmp_path, 4)
    with pytest.raises(ValueError, match="unknown shard format"):
        write_shard(tmp_path / "c.txt", torch.zeros(2, 2))


class TinyLM(nn.Module):
    """A randomly initialised toy language model: embedding, two blocks, an unembedding."""

    def __init__(self, vocab=50, d=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(2)])
        self.unembed = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.unembed(h)


def test_harvester_hooks_a_named_module():
    model = TinyLM()
    ids = torch.randint(0, 50, (3, 6))
    acts = Harvester(model, "blocks.0")(ids)
    expected = model.blocks[0](model.embed(ids)).reshape(-1, 12)
    torch.testing.assert_close(acts, expected)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    assert Harvester(model, "blocks.0")(ids, mask).shape == (16, 12)
    with pytest.raises(ValueError, match="not a module"):
        Harvester(model, "blocks.7")


def test_live_source_parts_run_the_model_on_their_own_batches():
    """A data group's part of a running-model source harvests every G-th batch of input ids, no other."""
    model = TinyLM()
    batches = [torch.full((2, 3), i) for i in range(7)]
    harvester = Harvester(model, "blocks.0")
    whole = HarvestSource(harvester, batches, 12, buffer_tokens=12, seed=1)
    seen = []
    model.embed.register_forward_hook(lambda _m, inputs, _o: seen.append(int(inputs[0].flatten()[0])))
    for g in range(3):
        part = whole.part(g, 3)
        assert part.batch_size == 4 and part.d_in == 12
        seen.clear()
        rows = torch.cat([part.next_batch() for _ in range(3)])  # 12 rows: the group's first two input batches
        assert sorted(set(seen)) == list(range(g, 7, 3))[:2] and rows.shape == (12, 12)
    with pytest.raises(ValueError, match=r"part \(2, 3\) \(group, groups\) cannot resume part \(0, 3\)"):
        whole.part(0, 3).load_state_dict(part.state_dict())
    with pytest.raises(ValueError, match="divisible by the data groups"):
        whole.part(0, 5)
    with pytest.raises(ValueError, match="8 data groups need 8 batches of input ids or more"):
        HarvestSource(harvester, batches, 16).part(0, 8)


class CharTokenizer:
    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [1 + ord(c) % 49 for c in text]}


def test_harvest_to_shards_and_stream(tmp_path):
    model = TinyLM()
    texts = [f"document number {i} with some text" for i in range(20)]
    batches = list(token_batches(texts, CharTokenizer(), context=8, batch_size=2))
    assert batches and all(b.shape == (2, 8) for b in batches)
    harvester = Harvester(model, "blocks.1")
    paths = harvest_to_shards(harvester, batches, tmp_path, shard_tokens=40, max_tokens=150)
    sizes = [open_shard(p)[0].shape[0] for p in paths]
    assert sum(sizes) == 150 and sizes[0] == 40
    direct = torch.cat([harvester(b) for b in batches])[:150]
    got = torch.cat([torch.from_numpy(np.array(open_shard(p)[0])) for p in paths])
    torch.testing.assert_close(got, direct)
    assert ShardSource(tmp_path, 10).d_in == 12

    stream = HarvestSource(harvester, batches, 10, buffer_tokens=32, seed=1)
    n_rows = sum(b.numel() for b in batches)
    rows = take(stream, n_rows // 10)
    assert rows.shape == (n_rows // 10 * 10, 12)
    stream2 = HarvestSource(harvester, batches, 10, buffer_tokens=32, seed=1)
    take(stream2, 5)
    state, expected = stream2.state_dict(), take(stream2, 30)
    stream3 = HarvestSource(harvester, batches, 10, buffer_tokens=32, seed=1)
    stream3.load_state_dict(state)
    torch.testing.assert_close(take(stream3, 30), expected)


def test_harvest_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2Model(config)
    ids = torch.randint(0, 64, (2, 8))
    acts = Harvester(model, "h.0")(ids)
    assert acts.shape == (16, 16)
    full = model(ids, output_hidden_states=True).hidden_states[1].reshape(-1, 16)
    torch.testing.assert_close(acts, full)
