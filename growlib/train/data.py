"""Training data that needs no download: text corpora, tokenizers, token streams, and batches deterministic by
step (the batch of step s depends only on (seed, s), so a resumed run sees exactly the batches it would have).

The default corpus is the interpreter's own standard library (real text that ships with every Python); user
text files, pre-tokenized ``.bin`` files and Hugging Face ``datasets`` are the alternatives.  Images for ViT are
scikit-learn's bundled 8x8 digits.  ``datasets`` and scikit-learn are optional: imported only when used."""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import tempfile
import tokenize
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from growlib.validate import is_number, require_int

VALIDATION_EVERY = 10      # every 10th document (in path order) is validation: splits never share a file
SPECIAL_TOKENS = ("<pad>", "<mask>", "<bos>", "<eos>")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "tkinter", "lib2to3", "ensurepip"})
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
BPE_RECIPE = "bytelevel-bpe-v1"   # part of the cache key: change it when the training recipe changes


# ----------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------

def _require_texts(name: str, texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
    if not texts:
        raise ValueError(f"{name} must hold at least one text, got an empty {type(texts).__name__}")
    return list(texts)


def _require_path(name: str, path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file or directory: {str(path)!r}")
    return path


def _split_by_document(docs: list) -> tuple[list, list]:
    """Every VALIDATION_EVERY-th document is validation (the last one if there are fewer)."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 non-empty documents to split train/validation by document, got "
                         f"{len(docs)}")
    val_at = {i for i in range(len(docs)) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1} or {len(docs) - 1}
    return ([d for i, d in enumerate(docs) if i not in val_at], [d for i, d in enumerate(docs) if i in val_at])


# ----------------------------------------------------------------------------------------------------------
# Text sources
# ----------------------------------------------------------------------------------------------------------

@functools.cache
def _stdlib_split() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """(train, validation) as (relative path, text) pairs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")
                   if not STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    docs = []
    for rel, p in files:
        with tokenize.open(p) as f:     # Python sources: honours a coding cookie
            text = f.read()
        if text:
            docs.append((rel, text))
    train, val = _split_by_document(docs)
    return tuple(train), tuple(val)


def stdlib_corpus() -> tuple[list[str], list[str]]:
    """(train_texts, validation_texts): this interpreter's standard-library ``.py`` sources, one text per file.

    Files are ordered by relative path and every 10th goes to validation, so the split is deterministic and no
    file is in both.  Tests, site-packages and the GUI / legacy packages are left out.  Read once per process."""
    train, val = _stdlib_split()
    return [text for _, text in train], [text for _, text in val]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"path: {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None


#: ``--data hf:NAME`` or ``hf:NAME:CONFIG`` names a Hugging Face dataset (its ``text`` column) instead of a path
HF_DATA_PREFIX = "hf:"


def is_hf_dataset(source: str) -> bool:
    return source.startswith(HF_DATA_PREFIX)


def load_texts(source: str) -> tuple[list[str], list[str]]:
    """(train_texts, validation_texts) of a data source: ``hf:NAME[:CONFIG]`` (``load_hf_dataset``), else a text
    file or folder (``load_text_source``)."""
    if isinstance(source, str) and is_hf_dataset(source):
        name, _, config = source[len(HF_DATA_PREFIX):].partition(":")
        return load_hf_dataset(name, config=config or None)
    return load_text_source(source)


def load_text_source(path) -> tuple[list[str], list[str]]:
    """(train_texts, validation_texts) from a text file or a folder of text files.

    A folder: every non-hidden file below it is one document, split by file like ``stdlib_corpus`` (fewer than
    10 files: the last one is validation).  A single file: its first 90% of lines train, the rest validate."""
    path = _require_path("path", path)
    if path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return _split_by_document([text for text in (_read_utf8(p) for _, p in files) if text])
    lines = _read_utf8(path).splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(f"path: a single file is split by lines, so it needs at least 2 lines; "
                         f"{str(path)!r} has {len(lines)}")
    cut = min(max(1, round(0.9 * len(lines))), len(lines) - 1)
    return ["".join(lines[:cut])], ["".join(lines[cut:])]


def load_hf_dataset(name: str, text_field: str = "text", config: str | None = None
                    ) -> tuple[list[str], list[str]]:
    """(train_texts, validation_texts) from a Hugging Face dataset (needs ``pip install datasets``).

    Validation is the dataset's 'validation' split, else its 'test' split, else every 10th training record."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (a Hugging Face dataset name), got {name!r}")
    try:
        import datasets
    except ImportError:
        raise ImportError("load_hf_dataset needs the Hugging Face 'datasets' package: pip install datasets"
                          ) from None
    splits = datasets.load_dataset(name, config)
    if "train" not in splits:
        raise ValueError(f"name: dataset {name!r} has no 'train' split, got splits {sorted(splits)}")
    if text_field not in splits["train"].column_names:
        raise ValueError(f"text_field must be a column of {name!r}, one of {splits['train'].column_names}, "
                         f"got {text_field!r}")
    train = [t for t in splits["train"][text_field] if t]
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    if held_out is None:
        return _split_by_document(train)
    return train, [t for t in splits[held_out][text_field] if t]


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------

class _SpecialTokens:
    """What a tokenizer growlib trains with provides: the special ids, and the check that encode gets text."""

    pad_id: int
    mask_id: int
    bos_id: int
    eos_id: int

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.mask_id, self.bos_id, self.eos_id)

    @staticmethod
    def _require_text(text) -> str:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return text


class BPETokenizer(_SpecialTokens):
    """A byte-level BPE tokenizer (a ``tokenizers.Tokenizer``); build one with ``train_bpe`` or ``from_file``.

    Byte-level pre-tokenization and decoding make ``decode(encode(text)) == text`` for every string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer must contain the special tokens {SPECIAL_TOKENS}, missing "
                             f"{[t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]}")
        self.pad_id, self.mask_id, self.bos_id, self.eos_id = ids

    @classmethod
    def from_file(cls, path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(_require_path("path", path))))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(self._require_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes in parallel (the ``tokenizers`` thread pool)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of ``ids``; special tokens are dropped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        """SHA-256 of the whole tokenizer (vocabulary, merges, settings): what its token ids depend on."""
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()


class HFTokenizer(_SpecialTokens):
    """A Hugging Face tokenizer (``--tokenizer DIR``, or the one saved with ``--init-from``'s checkpoint) behind the
    interface growlib's data code reads: ids, the special ids, encode / decode.  ``hf`` is the tokenizer itself,
    which a run saves with its model."""

    def __init__(self, hf, folder: str):
        self.hf, self.folder = hf, folder
        self.eos_id = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer: the tokenizer in {folder} has neither an eos nor a sep token to end "
                             "documents with")
        self.bos_id = hf.bos_token_id if hf.bos_token_id is not None else self.eos_id
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        self.mask_id = hf.mask_token_id  # None: the tokenizer cannot mask (a causal LM's)

    @classmethod
    def from_folder(cls, folder) -> HFTokenizer:
        from transformers import AutoTokenizer

        path = _require_path("tokenizer", folder)
        if not path.is_dir():
            raise ValueError(f"tokenizer: {str(path)!r} is not a folder holding a Hugging Face tokenizer")
        try:
            return cls(AutoTokenizer.from_pretrained(str(path)), str(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"tokenizer: no Hugging Face tokenizer could be read from {str(path)!r}: {error}"
                             ) from None

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.hf.all_special_ids)))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf(self._require_text(text), add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's files: what its token ids depend on."""
        from growlib.train.runs import folder_digest

        return folder_digest(self.folder)


def _texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))   # length-prefixed: ["ab", "c"] != ["a", "bc"]
        digest.update(data)
    return digest.hexdigest()


#: Bumped whenever what a cached token stream holds changes.
TOKEN_CACHE_FORMAT = 1


def tokenized_splits(train_texts: Sequence[str], validation_texts: Sequence[str], tokenizer,
                     cache_dir) -> tuple[TokenData, TokenData]:
    """Both splits tokenized (``TokenData.from_texts``), or read back from ``cache_dir/tokens`` when these very
    texts were tokenized before by this very tokenizer: the file name hashes the texts' content, the tokenizer's
    fingerprint and the cache format, so edited data or another tokenizer is tokenized again.  Written
    atomically, so a concurrent run reads no file or a whole one."""
    key = hashlib.sha256(f"{_texts_digest(train_texts)}|{_texts_digest(validation_texts)}|"
                         f"{tokenizer.fingerprint()}|{TOKEN_CACHE_FORMAT}".encode()).hexdigest()[:32]
    folder = Path(cache_dir) / "tokens"
    paths = [folder / f"{key}-{split}.npy" for split in ("train", "validation")]
    if all(path.exists() for path in paths):
        return tuple(TokenData(np.load(path)) for path in paths)
    splits = (TokenData.from_texts(train_texts, tokenizer), TokenData.from_texts(validation_texts, tokenizer))
    folder.mkdir(parents=True, exist_ok=True)
    for path, split in zip(paths, splits):
        _write_atomically(path, lambda tmp, ids=np.asarray(split.ids): _save_npy(tmp, ids))
    return splits


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a name that lacks it
        np.save(f, array)


def bpe_cache_path(texts: Sequence[str], vocab_size: int, cache_dir) -> Path:
    """Where ``train_bpe`` keeps the tokenizer for these arguments: the name hashes the texts' content, the
    vocabulary size, the ``tokenizers`` version and the training recipe, so any change retrains."""
    import tokenizers

    key = f"{_texts_digest(texts)}|{vocab_size}|{tokenizers.__version__}|{BPE_RECIPE}|{SPECIAL_TOKENS}"
    name = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir) / f"bpe-{vocab_size}-{name}.json"


def _train_bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_bpe(texts: Sequence[str], vocab_size: int, cache_dir) -> BPETokenizer:
    """A byte-level BPE tokenizer trained on ``texts``, or the cached one trained earlier on the same texts.

    The vocabulary holds the 4 special tokens, the 256 byte symbols and the merges, up to ``vocab_size`` (fewer
    if the texts run out of merges).  No subsampling: the whole stdlib train split takes ~2 s on 2 CPU cores."""
    texts = _require_texts("texts", texts)
    min_vocab = 256 + len(SPECIAL_TOKENS)
    vocab_size = require_int("vocab_size", vocab_size, minimum=min_vocab)
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a str or os.PathLike, got {type(cache_dir).__name__}")
    path = bpe_cache_path(texts, vocab_size, cache_dir)
    if path.exists():
        return BPETokenizer.from_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_bpe_tokenizer(texts, vocab_size)
    _write_atomically(path, tokenizer.save)
    return BPETokenizer(tokenizer)


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then renamed to it: a concurrent reader sees no file
    or the whole file, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------------
# Token streams
# ----------------------------------------------------------------------------------------------------------

class TokenData:
    """The token ids of one split as one 1-D stream, documents separated by eos.

    Held as an int32/int64 array in memory, or as a read-only memmap of a ``.bin`` file (only the windows a
    batch needs are read, so files larger than memory work)."""

    def __init__(self, ids):
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
            ids = ids.detach().cpu().numpy()
        if not isinstance(ids, np.ndarray):
            raise TypeError(f"ids must be a torch.Tensor or numpy.ndarray, got {type(ids).__name__}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"ids must hold integers, got dtype {ids.dtype}")
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
        self._array = ids

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer) -> TokenData:
        """Tokenize ``texts`` and concatenate them, an eos after each."""
        texts = _require_texts("texts", texts)
        _require_tokenizer(tokenizer)
        eos = np.array([tokenizer.eos_id], dtype=np.int32)
        parts = []
        for ids in tokenizer.encode_batch(texts):
            parts += [np.asarray(ids, dtype=np.int32), eos]
        return cls(np.concatenate(parts))

    @classmethod
    def from_bin(cls, path, dtype: str = "uint16") -> TokenData:
        """A pre-tokenized ``.bin`` file: raw little-endian token ids, 'uint16' or 'uint32', memory-mapped."""
        np_dtype = _bin_dtype(dtype)
        path = _require_path("path", path)
        size = path.stat().st_size
        if size == 0 or size % np_dtype.itemsize:
            raise ValueError(f"path: {str(path)!r} holds {size} bytes, not a positive multiple of the "
                             f"{np_dtype.itemsize}-byte dtype {dtype!r}")
        ids = np.memmap(path, dtype=np_dtype, mode="r")
        if np_dtype.itemsize == 2 and _looks_like_uint32(ids):
            raise ValueError(f"path: {str(path)!r} read as uint16 has 0 at nearly every odd position: it holds uint32 "
                             "token ids (each id's high half is 0 below 65,536); read it with dtype='uint32'")
        return cls(ids)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def fingerprint(self) -> str:
        """SHA-256 of the ids (their dtype and length included), so a run can tell its data from other data
        or another tokenizer's.  Streams over 64 MiB hash 256 evenly spaced 64 KiB chunks instead of every
        byte, so a memmapped file of many GB is fingerprinted in milliseconds."""
        return array_fingerprint(self._array)

    @property
    def ids(self) -> torch.Tensor:
        """The whole stream as an int32 (int64 for uint32 files) tensor; a memmapped file is read in full."""
        array = self._array
        if isinstance(array, np.memmap) or array.dtype not in (np.int32, np.int64):
            array = array.astype(np.int64 if array.dtype.itemsize >= 4 else np.int32)
        return torch.from_numpy(array)

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(len(starts), length) int64: the tokens ``[s, s + length)`` for each start s."""
        length = require_int("length", length)
        if starts.dim() != 1 or starts.is_floating_point():
            raise TypeError(f"starts must be a 1-D integer tensor, got {starts.dtype} {tuple(starts.shape)}")
        if len(starts) and (int(starts.min()) < 0 or int(starts.max()) + length > len(self)):
            raise ValueError(f"starts must lie in [0, {len(self) - length}] for windows of {length} tokens in "
                             f"{len(self)}, got [{int(starts.min())}, {int(starts.max())}]")
        index = starts.numpy()[:, None].astype(np.int64) + np.arange(length, dtype=np.int64)
        return torch.from_numpy(self._array[index].astype(np.int64))


_FULL_HASH_BYTES = 64 << 20
_CHUNKS, _CHUNK_BYTES = 256, 64 << 10


def array_fingerprint(array: np.ndarray) -> str:
    """``TokenData.fingerprint`` of any array: its dtype, shape and (sampled above 64 MiB) bytes."""
    digest = hashlib.sha256(f"{array.dtype.str} {array.shape}".encode())
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if flat.size <= _FULL_HASH_BYTES:
        digest.update(flat.tobytes())
    else:
        for start in np.linspace(0, flat.size - _CHUNK_BYTES, _CHUNKS).astype(np.int64):
            digest.update(flat[start:start + _CHUNK_BYTES].tobytes())
    return digest.hexdigest()


def _looks_like_uint32(ids: np.ndarray, sample: int = 1 << 20) -> bool:
    """uint32 ids read as uint16 interleave each id's low half with its high half, 0 for any id under 65,536."""
    head = np.asarray(ids[:sample])
    if len(head) < 64:
        return False
    return (head[1::2] == 0).mean() > 0.95 and (head[0::2] == 0).mean() < 0.5


def _bin_dtype(dtype) -> np.dtype:
    try:
        name = np.dtype(dtype).name
    except (TypeError, ValueError):
        name = None
    if name not in BIN_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(BIN_DTYPES)}, got {dtype!r}")
    return np.dtype(BIN_DTYPES[name]).newbyteorder("<")


def _require_tokenizer(tokenizer) -> None:
    missing = [a for a in ("vocab_size", "encode_batch", "decode", "pad_id", "mask_id", "eos_id", "special_ids")
               if not hasattr(tokenizer, a)]
    if missing:
        raise TypeError(f"tokenizer must be a BPETokenizer or HFTokenizer (or provide {missing}), got "
                        f"{type(tokenizer).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------

def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step) alone: the randomness of a step never depends on earlier ones."""
    seed = require_int("seed", seed, minimum=None)
    step = require_int("step", step, minimum=0)
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _check_windows(data, batch_size: int, seq_len: int) -> None:
    if not isinstance(data, TokenData):
        raise TypeError(f"data must be a TokenData, got {type(data).__name__}")
    require_int("batch_size", batch_size)
    require_int("seq_len", seq_len)
    if seq_len > len(data):
        raise ValueError(f"seq_len must be <= the split's {len(data)} tokens, got {seq_len}")


def _random_windows(data: TokenData, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=generator)
    return data.windows(starts, seq_len)


def causal_lm_batch(data: TokenData, step: int, batch_size: int, seq_len: int, seed: int
                    ) -> dict[str, torch.Tensor]:
    """``batch_size`` random windows of ``seq_len`` tokens, drawn from (seed, step) alone.

    labels == input_ids: Hugging Face causal LMs shift the labels themselves."""
    _check_windows(data, batch_size, seq_len)
    input_ids = _random_windows(data, batch_size, seq_len, step_generator(seed, step))
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _check_mask_prob(mask_prob) -> float:
    if not is_number(mask_prob):
        raise TypeError(f"mask_prob must be a number, got {type(mask_prob).__name__}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must lie in (0, 1), got {mask_prob}")
    return float(mask_prob)


def _bert_mask(input_ids: torch.Tensor, tokenizer, mask_prob: float, generator: torch.Generator
               ) -> dict[str, torch.Tensor]:
    """BERT's masking: each non-special token is chosen with ``mask_prob`` (at least one per batch); a chosen
    token becomes mask (80%), a random token (10%) or stays (10%); labels are -100 where not chosen."""
    special = torch.tensor(tokenizer.special_ids, dtype=input_ids.dtype)
    candidate = ~torch.isin(input_ids, special)
    chosen = (torch.rand(input_ids.shape, generator=generator) < mask_prob) & candidate
    if not chosen.any():
        # at least one label, else the loss is NaN: a random candidate (any position if all are special)
        pool = candidate.flatten().nonzero().flatten() if candidate.any() else torch.arange(input_ids.numel())
        chosen.view(-1)[pool[torch.randint(len(pool), (1,), generator=generator)]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    regular = torch.from_numpy(np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.special_ids))
    random_ids = regular[torch.randint(len(regular), input_ids.shape, generator=generator)]
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, tokenizer.mask_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return {"input_ids": masked, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def mlm_batch(data: TokenData, step: int, batch_size: int, seq_len: int, seed: int, tokenizer,
              mask_prob: float = 0.15) -> dict[str, torch.Tensor]:
    """Random windows as ``causal_lm_batch``, BERT-masked; windows and masking drawn from (seed, step) alone."""
    _check_windows(data, batch_size, seq_len)
    _require_tokenizer(tokenizer)
    mask_prob = _check_mask_prob(mask_prob)
    generator = step_generator(seed, step)
    return _bert_mask(_random_windows(data, batch_size, seq_len, generator), tokenizer, mask_prob, generator)


def _spread_indices(available: int, wanted: int, subset: int, subsets: int) -> torch.Tensor:
    """Indices of up to ``wanted`` items spread evenly over ``available`` ones, for subset ``subset`` of
    ``subsets`` disjoint ones: item ``i * stride + subset``.  Spread rather than the first ones, so that a fixed
    evaluation samples the whole split (the stdlib's validation files differ by a whole nat in loss from one to
    the next) and disjoint subsets of the same size measure how much an evaluation moves with its sample."""
    subsets = require_int("subsets", subsets)
    require_int("subset", subset, 0, subsets - 1)
    count = min(available // subsets, wanted)
    if count == 0:
        raise ValueError(f"the validation split holds {available} windows or images, too few for {subsets} "
                         "disjoint subsets")
    return torch.arange(count) * (available // count) + subset


def _validation_windows(data: TokenData, batch_size: int, seq_len: int, max_batches: int, subset: int = 0,
                        subsets: int = 1) -> list[torch.Tensor]:
    _check_windows(data, batch_size, seq_len)
    max_batches = require_int("max_batches", max_batches)
    starts = _spread_indices(len(data) // seq_len, batch_size * max_batches, subset, subsets) * seq_len
    return [data.windows(chunk, seq_len) for chunk in starts.split(batch_size)]


def validation_batches(data: TokenData, batch_size: int, seq_len: int, max_batches: int, subset: int = 0,
                       subsets: int = 1) -> list[dict[str, torch.Tensor]]:
    """Causal-LM evaluation batches: non-overlapping windows spread evenly over the split, the same on every
    call (the last batch may be smaller; at most ``max_batches``).  ``subset`` of ``subsets``: one of that many
    disjoint such sets (subset 0 of any number is the default set while the split holds enough windows)."""
    return [{"input_ids": ids, "labels": ids.clone()}
            for ids in _validation_windows(data, batch_size, seq_len, max_batches, subset, subsets)]


def mlm_validation_batches(data: TokenData, batch_size: int, seq_len: int, max_batches: int, tokenizer,
                           mask_prob: float = 0.15, seed: int = 0, subset: int = 0,
                           subsets: int = 1) -> list[dict[str, torch.Tensor]]:
    """The windows of ``validation_batches``, BERT-masked with a fixed seed: the same on every call."""
    _require_tokenizer(tokenizer)
    mask_prob = _check_mask_prob(mask_prob)
    return [_bert_mask(ids, tokenizer, mask_prob, step_generator(seed, i))
            for i, ids in enumerate(_validation_windows(data, batch_size, seq_len, max_batches, subset, subsets))]


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def digits_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_images, train_labels, val_images, val_labels): scikit-learn's bundled 8x8 digits (no download).

    Images are float32 (N, 3, 8, 8) in [0, 1], the gray level copied to 3 channels; labels int64.  Every 10th
    image is validation.  Needs ``pip install scikit-learn``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("digits_images needs scikit-learn for its bundled digits: pip install scikit-learn"
                          ) from None
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div(16.0).unsqueeze(1).expand(-1, 3, -1, -1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    val = torch.arange(len(labels)) % VALIDATION_EVERY == VALIDATION_EVERY - 1
    return images[~val].contiguous(), labels[~val], images[val].contiguous(), labels[val]


def _check_images(images, labels) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise TypeError(f"images must be a float tensor (N, C, H, W), got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},), got "
                         f"{tuple(getattr(labels, 'shape', ()))}")


def image_batch(images: torch.Tensor, labels: torch.Tensor, step: int, batch_size: int, seed: int
                ) -> dict[str, torch.Tensor]:
    """``batch_size`` random images (with replacement) drawn from (seed, step) alone, as ViT's keyword
    arguments ``pixel_values`` and ``labels``."""
    _check_images(images, labels)
    require_int("batch_size", batch_size)
    index = torch.randint(len(labels), (batch_size,), generator=step_generator(seed, step))
    return {"pixel_values": images[index], "labels": labels[index]}


def image_validation_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, max_batches: int,
                             subset: int = 0, subsets: int = 1) -> list[dict[str, torch.Tensor]]:
    """Up to ``batch_size * max_batches`` images spread evenly over the split (all of them, in order, when
    they fit), in batches (the last may be smaller); ``subset`` / ``subsets`` as ``validation_batches``."""
    _check_images(images, labels)
    require_int("batch_size", batch_size)
    chosen = _spread_indices(len(labels), batch_size * require_int("max_batches", max_batches), subset, subsets)
    return [{"pixel_values": images[chunk], "labels": labels[chunk]} for chunk in chosen.split(batch_size)]
