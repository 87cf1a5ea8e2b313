"""Training data: the stdlib corpus, tokenizers and their cache, token streams, batches deterministic by step."""

from __future__ import annotations

import sys
import types
from typing import Sequence

import numpy as np
import pytest
import torch

from growlib.train import data as D

VOCAB = 512


class ByteTokenizer(D._SpecialTokens):
    """UTF-8 bytes as ids 0..255, then the special tokens pad, mask, bos, eos (256..259): a tokenizer the tests need
    not train."""

    pad_id, mask_id, bos_id, eos_id = 256, 257, 258, 259

    @property
    def vocab_size(self) -> int:
        return 256 + len(D.SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(self._require_text(text).encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """The text of ``ids``; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def corpus():
    return D.stdlib_corpus()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bpe")


@pytest.fixture(scope="module")
def bpe(corpus, bpe_dir):
    return D.train_bpe(corpus[0], VOCAB, bpe_dir)


@pytest.fixture(scope="module")
def byte_val(corpus):
    return D.TokenData.from_texts(corpus[1], ByteTokenizer())


# ----------------------------------------------------------------------------------------------------------
# Corpus and text sources
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stdlib_corpus_is_non_empty_deterministic_and_split_by_file(corpus):
    train, val = corpus
    assert len(train) > 100 and len(val) > 10 and all(train) and all(val)
    assert D.stdlib_corpus() == (train, val)
    train_files, val_files = ([rel for rel, _ in split] for split in D._stdlib_split())
    assert not set(train_files) & set(val_files)
    assert train_files == sorted(train_files) and val_files == sorted(val_files)
    assert abs(len(val_files) / (len(train_files) + len(val_files)) - 0.1) < 0.01
    for rel in train_files + val_files:
        assert not D.STDLIB_SKIP_DIRS.intersection(rel.split("/")[:-1]), rel
    assert "argparse.py" in train_files + val_files


def test_stdlib_corpus_is_cached_and_returns_fresh_lists(corpus):
    again = D.stdlib_corpus()
    again[0].clear()
    assert D.stdlib_corpus()[0] == corpus[0]
    assert D._stdlib_split.cache_info().hits >= 1


def test_text_folder_is_split_by_file_and_skips_hidden_and_empty_files(tmp_path):
    for i in range(12):
        (tmp_path / "sub" if i % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "sub" if i % 2 else tmp_path) / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "empty.txt").write_text("")
    train, val = D.load_text_source(tmp_path)
    ordered = sorted(((f"sub/doc{i:02d}.txt" if i % 2 else f"doc{i:02d}.txt"), f"document {i}\n")
                     for i in range(12))
    assert val == [ordered[9][1]]
    assert train == [text for k, (_, text) in enumerate(ordered) if k != 9]


def test_small_text_folder_keeps_its_last_file_for_validation(tmp_path):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(name)
    assert D.load_text_source(str(tmp_path)) == (["a", "b"], ["c"])


def test_single_text_file_is_split_by_lines(tmp_path):
    path = tmp_path / "book.txt"
    lines = [f"line {i} ü\n" for i in range(20)]
    path.write_text("".join(lines), encoding="utf-8")
    train, val = D.load_text_source(path)
    assert train == ["".join(lines[:18])] and val == ["".join(lines[18:])]


def test_text_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        D.load_text_source(tmp_path / "missing.txt")
    with pytest.raises(TypeError, match="path"):
        D.load_text_source(3)
    (tmp_path / "one.txt").write_text("just one line")
    with pytest.raises(ValueError, match="at least 2 lines"):
        D.load_text_source(tmp_path / "one.txt")
    with pytest.raises(ValueError, match="at least 2 non-empty documents"):
        D.load_text_source(tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        D.load_text_source(tmp_path)


def test_an_hf_data_source_reads_the_named_dataset_and_config(monkeypatch):
    """``--data hf:NAME:CONFIG`` reaches load_hf_dataset (a stand-in ``datasets`` module records the call)."""
    class Split:
        def __init__(self, texts):
            self.texts, self.column_names = texts, ["text", "label"]

        def __getitem__(self, column):
            return self.texts if column == "text" else [0] * len(self.texts)

    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return {"train": Split(["a", "", "b"]), "test": Split(["c"])}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert D.load_texts("hf:someone/corpus:raw") == (["a", "b"], ["c"])
    assert D.load_texts("hf:corpus") == (["a", "b"], ["c"])
    assert calls == [("someone/corpus", "raw"), ("corpus", None)]


def test_hf_dataset_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)     # import fails even where datasets is installed
    with pytest.raises(ImportError, match="pip install datasets"):
        D.load_hf_dataset("wikitext")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------

SNIPPETS = ["", "x", "  leading spaces\n\ttabs\r\nand CRLF", "naïve café — ünïcode ✓ 🐍", "def f(x):\n    return x\n"]


def test_byte_tokenizer_round_trips_and_keeps_specials_out_of_text(corpus):
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and len(set(tok.special_ids)) == 4 and min(tok.special_ids) == 256
    for text in SNIPPETS + corpus[1][:5]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode([tok.eos_id, *tok.encode("ab"), tok.pad_id]) == "ab"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([300])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")


@pytest.mark.slow
def test_bpe_round_trips_text_exactly(bpe, corpus):
    assert bpe.vocab_size == VOCAB
    assert len({bpe.pad_id, bpe.mask_id, bpe.bos_id, bpe.eos_id}) == 4
    texts = SNIPPETS + [t[:2000] for t in corpus[1][:20]]
    for text in texts:
        ids = bpe.encode(text)
        assert not set(ids) & set(bpe.special_ids)
        assert bpe.decode(ids) == text
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    text = corpus[1][0]
    assert len(bpe.encode(text)) < 0.6 * len(text.encode())       # merges learned: shorter than bytes


def test_bpe_second_call_loads_from_the_cache(bpe, corpus, bpe_dir, monkeypatch):
    path = D.bpe_cache_path(corpus[0], VOCAB, bpe_dir)
    assert path.exists() and list(bpe_dir.iterdir()) == [path]
    mtime = path.stat().st_mtime_ns

    def no_training(*args):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(D, "_train_bpe_tokenizer", no_training)
    again = D.train_bpe(corpus[0], VOCAB, str(bpe_dir))
    assert path.stat().st_mtime_ns == mtime
    assert again.encode(corpus[1][3]) == bpe.encode(corpus[1][3])


def test_bpe_cache_key_changes_with_texts_and_vocab(corpus, tmp_path):
    base = D.bpe_cache_path(corpus[0], VOCAB, tmp_path)
    assert D.bpe_cache_path(list(corpus[0]), VOCAB, tmp_path) == base
    assert D.bpe_cache_path(corpus[0][:-1], VOCAB, tmp_path) != base
    assert D.bpe_cache_path(corpus[0], VOCAB + 1, tmp_path) != base
    assert D.bpe_cache_path(["ab", "c"], VOCAB, tmp_path) != D.bpe_cache_path(["a", "bc"], VOCAB, tmp_path)


def test_train_bpe_validation(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_bpe(["some text"], 100, tmp_path)
    with pytest.raises(TypeError, match="vocab_size"):
        D.train_bpe(["some text"], 512.0, tmp_path)
    with pytest.raises(TypeError, match="texts"):
        D.train_bpe("some text", 512, tmp_path)
    with pytest.raises(ValueError, match="texts"):
        D.train_bpe([], 512, tmp_path)
    with pytest.raises(TypeError, match="cache_dir"):
        D.train_bpe(["some text"], 512, None)


# ----------------------------------------------------------------------------------------------------------
# Token streams
# ----------------------------------------------------------------------------------------------------------

def test_token_data_from_texts_separates_documents_with_eos(bpe):
    for tok in (ByteTokenizer(), bpe):
        texts = ["first doc", "second ✓"]
        ids = D.TokenData.from_texts(texts, tok).ids
        assert ids.dtype == torch.int32
        expected = tok.encode(texts[0]) + [tok.eos_id] + tok.encode(texts[1]) + [tok.eos_id]
        assert ids.tolist() == expected


@pytest.mark.parametrize("dtype,top", [("uint16", 2**16 - 1), ("uint32", 2**32 - 1), (np.uint16, 60_000)])
def test_bin_memmap_round_trip(tmp_path, dtype, top):
    values = np.linspace(0, top, 1000).astype(np.dtype(dtype).newbyteorder("<"))
    path = tmp_path / "tokens.bin"
    values.tofile(path)
    stream = D.TokenData.from_bin(path, dtype)
    assert len(stream) == 1000
    assert stream.ids.tolist() == values.astype(np.int64).tolist()
    window = stream.windows(torch.tensor([0, 990]), 10)
    assert window.dtype == torch.int64 and window.tolist() == [values[:10].tolist(), values[990:].tolist()]


def test_bin_errors(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(5, dtype=np.uint16).tofile(path)
    for dtype in ("int16", "float32", "uint8", "nonsense"):
        with pytest.raises(ValueError, match="dtype"):
            D.TokenData.from_bin(path, dtype)
    with pytest.raises(ValueError, match="multiple"):
        D.TokenData.from_bin(path, "uint32")                 # 10 bytes
    with pytest.raises(FileNotFoundError, match="path"):
        D.TokenData.from_bin(tmp_path / "missing.bin", "uint16")


def test_token_data_validation():
    with pytest.raises(TypeError, match="ids"):
        D.TokenData(torch.zeros(4))
    with pytest.raises(ValueError, match="ids"):
        D.TokenData(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="starts"):
        D.TokenData(torch.arange(10)).windows(torch.tensor([5]), 6)
    with pytest.raises(TypeError, match="tokenizer"):
        D.TokenData.from_texts(["a"], object())


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------

def test_causal_batches_are_deterministic_by_step(byte_val):
    a = D.causal_lm_batch(byte_val, 7, 4, 32, seed=1)
    assert a["input_ids"].shape == (4, 32) and a["input_ids"].dtype == torch.int64
    assert torch.equal(a["labels"], a["input_ids"])
    D.causal_lm_batch(byte_val, 8, 4, 32, seed=1)              # an intervening step changes nothing
    b = D.causal_lm_batch(byte_val, 7, 4, 32, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(D.causal_lm_batch(byte_val, 8, 4, 32, seed=1)["input_ids"], a["input_ids"])
    assert not torch.equal(D.causal_lm_batch(byte_val, 7, 4, 32, seed=2)["input_ids"], a["input_ids"])
    # every row is a contiguous window of the stream
    stream = byte_val.ids.long()
    for row in a["input_ids"]:
        starts = (stream[: len(stream) - 31] == row[0]).nonzero().flatten()
        assert any(torch.equal(stream[s:s + 32], row) for s in starts.tolist())


def test_mlm_masks_like_bert(byte_val):
    tok = ByteTokenizer()
    batch = D.mlm_batch(byte_val, 3, 64, 256, seed=0, tokenizer=tok)
    original = D.causal_lm_batch(byte_val, 3, 64, 256, seed=0)["input_ids"]  # same (seed, step): same windows
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == batch["labels"].shape == (64, 256)
    assert torch.equal(batch["attention_mask"], torch.ones(64, 256, dtype=torch.int64))
    chosen = batch["labels"] != -100
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["input_ids"][~chosen], original[~chosen])        # only chosen tokens change
    assert not torch.isin(original[chosen], torch.tensor(tok.special_ids)).any()
    regular = ~torch.isin(original, torch.tensor(tok.special_ids))
    assert abs(chosen.sum() / regular.sum() - 0.15) < 0.015
    masked = batch["input_ids"][chosen] == tok.mask_id
    kept = batch["input_ids"][chosen] == original[chosen]
    assert abs(masked.float().mean() - 0.8) < 0.04
    assert abs(kept.float().mean() - 0.1) < 0.03
    assert abs((~masked & ~kept).float().mean() - 0.1) < 0.03
    assert batch["input_ids"].max() < 256 or (batch["input_ids"] == tok.mask_id).any()
    again = D.mlm_batch(byte_val, 3, 64, 256, seed=0, tokenizer=tok)
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_mlm_random_replacements_are_regular_tokens(bpe, corpus):
    stream = D.TokenData.from_texts(corpus[1][:5], bpe)
    batch = D.mlm_batch(stream, 0, 32, 64, seed=5, tokenizer=bpe, mask_prob=0.5)
    changed = batch["input_ids"][(batch["labels"] != -100) & (batch["input_ids"] != batch["labels"])]
    replaced = changed[changed != bpe.mask_id]
    assert len(replaced) > 0 and not torch.isin(replaced, torch.tensor(bpe.special_ids)).any()
    assert int(batch["input_ids"].max()) < bpe.vocab_size


def test_mlm_always_masks_at_least_one_position():
    tok = ByteTokenizer()
    stream = D.TokenData(torch.tensor([65, 66, tok.eos_id, 67] * 4))
    for step in range(50):
        batch = D.mlm_batch(stream, step, 1, 4, seed=0, tokenizer=tok, mask_prob=1e-6)
        assert (batch["labels"] != -100).sum() == 1
    only_specials = D.TokenData(torch.full((8,), tok.eos_id))
    assert (D.mlm_batch(only_specials, 0, 2, 4, seed=0, tokenizer=tok)["labels"] != -100).sum() == 1


def test_validation_batches_spread_over_the_split_and_are_identical_across_calls(byte_val):
    batches = D.validation_batches(byte_val, 3, 50, max_batches=4)
    assert [b["input_ids"].shape for b in batches] == [(3, 50)] * 4
    stride = (len(byte_val) // 50) // 12
    expected = torch.stack([byte_val.ids[w * stride * 50:(w * stride + 1) * 50] for w in range(12)]).long()
    assert stride > 1 and torch.equal(torch.cat([b["input_ids"] for b in batches]), expected)
    again = D.validation_batches(byte_val, 3, 50, max_batches=4)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)
    short = D.TokenData(torch.arange(100))  # fewer windows than asked for: all of them, in order
    assert [b["input_ids"].shape[0] for b in D.validation_batches(short, 3, 20, max_batches=10)] == [3, 2]
    assert torch.equal(torch.cat([b["input_ids"] for b in D.validation_batches(short, 3, 20, 10)]).flatten(),
                       torch.arange(100))


def test_validation_subsets_are_disjoint_and_the_first_is_the_default_set(byte_val):
    windows = [torch.cat([b["input_ids"] for b in D.validation_batches(byte_val, 3, 50, 4, subset=k, subsets=5)])
               for k in range(5)]
    assert all(w.shape == (12, 50) for w in windows)
    rows = {tuple(row.tolist()) for w in windows for row in w}
    assert len(rows) == 60  # no window in two subsets
    default = torch.cat([b["input_ids"] for b in D.validation_batches(byte_val, 3, 50, 4)])
    assert torch.equal(windows[0], default)
    too_many = len(byte_val) // 50 + 1
    with pytest.raises(ValueError, match=f"too few for {too_many} disjoint subsets"):
        D.validation_batches(byte_val, 3, 50, 4, subset=0, subsets=too_many)
    with pytest.raises(ValueError, match=r"subset must be an int in \[0, 4\], got 5"):
        D.validation_batches(byte_val, 3, 50, 4, subset=5, subsets=5)


def test_mlm_validation_batches_are_fixed(byte_val):
    tok = ByteTokenizer()
    first = D.mlm_validation_batches(byte_val, 4, 64, 3, tok)
    again = D.mlm_validation_batches(byte_val, 4, 64, 3, tok)
    assert len(first) == 3 and all(torch.equal(x[k], y[k]) for x, y in zip(first, again) for k in x)
    windows = D.validation_batches(byte_val, 4, 64, 3)
    for masked, plain in zip(first, windows):
        chosen = masked["labels"] != -100
        assert chosen.any() and torch.equal(masked["labels"][chosen], plain["input_ids"][chosen])
    other = D.mlm_validation_batches(byte_val, 4, 64, 3, tok, seed=1)
    assert not torch.equal(other[0]["labels"], first[0]["labels"])


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=2.0), TypeError, "batch_size"),
    (dict(seq_len=0), ValueError, "seq_len"),
    (dict(seq_len=10_000_000), ValueError, "seq_len"),
    (dict(step=-1), ValueError, "step"),
    (dict(seed="0"), TypeError, "seed"),
    (dict(data=torch.arange(100)), TypeError, "data"),
])
def test_batch_argument_errors(byte_val, kwargs, error, name):
    args = dict(data=byte_val, step=0, batch_size=2, seq_len=16, seed=0) | kwargs
    with pytest.raises(error, match=name):
        D.causal_lm_batch(**args)
    with pytest.raises(error, match=name):
        D.mlm_batch(**args, tokenizer=ByteTokenizer())


@pytest.mark.parametrize("mask_prob", [0.0, 1.0, -0.1, 1.5])
def test_mask_prob_must_lie_strictly_between_0_and_1(byte_val, mask_prob):
    with pytest.raises(ValueError, match="mask_prob"):
        D.mlm_batch(byte_val, 0, 2, 16, 0, ByteTokenizer(), mask_prob=mask_prob)
    with pytest.raises(ValueError, match="mask_prob"):
        D.mlm_validation_batches(byte_val, 2, 16, 1, ByteTokenizer(), mask_prob=mask_prob)


def test_validation_batch_errors(byte_val):
    with pytest.raises(ValueError, match="max_batches"):
        D.validation_batches(byte_val, 2, 16, 0)
    with pytest.raises(ValueError, match="seq_len"):
        D.validation_batches(D.TokenData(torch.arange(10)), 2, 16, 1)


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        D.digits_images()


@pytest.mark.slow
def test_digits_images_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    train_x, train_y, val_x, val_y = D.digits_images()
    assert train_x.shape[1:] == val_x.shape[1:] == (3, 8, 8) and train_x.dtype == torch.float32
    assert len(train_x) == len(train_y) and len(val_x) == len(val_y) and len(train_x) + len(val_x) == 1797
    assert 0.0 <= float(train_x.min()) and float(train_x.max()) <= 1.0
    assert torch.equal(train_x[:, 0], train_x[:, 2]) and set(val_y.tolist()) == set(range(10))
    assert all(torch.equal(a, b) for a, b in zip(D.digits_images(), (train_x, train_y, val_x, val_y)))


def test_image_batches_are_deterministic_by_step():
    images, labels = torch.rand(50, 3, 8, 8), torch.arange(50)
    a = D.image_batch(images, labels, 4, 16, seed=0)
    assert a["pixel_values"].shape == (16, 3, 8, 8) and a["labels"].shape == (16,)
    assert torch.equal(a["pixel_values"], images[a["labels"]])        # images stay with their labels
    b = D.image_batch(images, labels, 4, 16, seed=0)
    assert torch.equal(a["labels"], b["labels"])
    assert not torch.equal(D.image_batch(images, labels, 5, 16, seed=0)["labels"], a["labels"])
    val = D.image_validation_batches(images, labels, 16, max_batches=10)
    assert [len(v["labels"]) for v in val] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([v["labels"] for v in val]), labels)


def test_image_batch_errors():
    images, labels = torch.rand(10, 3, 8, 8), torch.arange(10)
    with pytest.raises(ValueError, match="batch_size"):
        D.image_batch(images, labels, 0, 0, seed=0)
    with pytest.raises(TypeError, match="images"):
        D.image_batch(torch.rand(10, 8, 8), labels, 0, 2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        D.image_batch(images, labels[:5], 0, 2, seed=0)
    with pytest.raises(ValueError, match="step"):
        D.image_batch(images, labels, -1, 2, seed=0)


def test_uint32_ids_read_as_uint16_are_refused_and_read_right_as_uint32(tmp_path):
    """Read as uint16, uint32 ids interleave each id with its high half (0): refused, not trained on."""
    from growlib.train.experiment import Experiment, prepare_data

    ids = np.random.default_rng(0).integers(1, 300, size=5000).astype("<u4")
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    with pytest.raises(ValueError, match="read as uint16 has 0 at nearly every odd position: it holds uint32"):
        D.TokenData.from_bin(path)
    assert torch.equal(D.TokenData.from_bin(path, "uint32").ids, torch.from_numpy(ids.astype(np.int64)))
    prepared = prepare_data(Experiment(data=str(path), vocab_size=300, bin_dtype="uint32", device="cpu"))
    assert len(prepared.train) + len(prepared.validation) == 5000
    with pytest.raises(ValueError, match="Experiment.bin_dtype must be one of"):
        Experiment(data=str(path), bin_dtype="int8")


def test_token_ids_are_cached_per_texts_and_tokenizer(tmp_path, monkeypatch):
    """A second run reads the token ids back; other texts or another tokenizer tokenize again."""
    texts = (["def f(x):\n    return x\n"] * 40, ["print(1)\n"] * 5)
    bpe = D.train_bpe(texts[0], 300, tmp_path)
    first = D.tokenized_splits(*texts, bpe, tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2

    def no_tokenizing(*args):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patched:
        patched.setattr(D.TokenData, "from_texts", no_tokenizing)
        again = D.tokenized_splits(*texts, bpe, tmp_path)
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(first, again))
    D.tokenized_splits(texts[0] + ["x = 1\n"], texts[1], bpe, tmp_path)            # edited data
    other = D.train_bpe(["while True: yield lambda y: y ** 2\n"] * 40, 300, tmp_path)
    assert other.fingerprint() != bpe.fingerprint()
    D.tokenized_splits(*texts, other, tmp_path)                                      # another tokenizer
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 6
    assert not list((tmp_path / "tokens").glob("*.tmp"))
