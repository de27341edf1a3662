"""BERT's WordPiece tokenizer and input packing, as TensorFlow ops (so they run inside graphs).

The output is that of Google's original BERT `tokenization.py`, with the two
choices of Hugging Face's `tokenizers` that the project's reference outputs show:

- clean the text: drop NUL, U+FFFD and control/format characters (categories Cc,
  Cf), map tab, newline, CR and category Zs to spaces. Private-use characters (Co)
  are dropped too, as Hugging Face does (Google's code keeps them, as [UNK]);
  unassigned code points (Cn) are kept, as both do;
- if lower-casing: lower-case, NFD, drop non-spacing marks (Mn). Lower-casing is per
  code point, as in Hugging Face's tokenizers: `Σ` always becomes `σ`, never the
  word-final `ς` of Python's `str.lower`;
- split on whitespace, punctuation (ASCII symbols and categories P*) and CJK
  ideographs, then greedy longest-match-first WordPiece with `##` continuations; a
  word of over 100 characters becomes [UNK] (Hugging Face's limit; Google's is 200).

Character classes come from Python's `unicodedata` (Unicode 14 on Python 3.11),
as in Google's code; Hugging Face's tables are older.

tensorflow-text's `FastBertTokenizer` does the splitting and WordPiece, but its own
normalizer folds NFKC-style (`½` -> `1⁄2`, `ﬁ` -> `fi`, `ß` -> `ss`, full-width
forms, ...) and turns control characters into spaces instead of dropping them. Its
normalizer is a per-code-point lookup table, so we build that table ourselves and
hand it to `FastBertNormalizer`: the fix costs nothing at run time.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import sys
import unicodedata
from pathlib import Path

import flatbuffers
import numpy as np
import tensorflow as tf

from bertfit.errors import ConfigError

MAX_CHARS_PER_WORD = 100
TRUNCATION_STRATEGIES = ("longest_first", "only_second", "head", "tail", "head+tail")
# Sun et al. 2019 ("How to Fine-Tune BERT for Text Classification?"): for 512 tokens,
# the first 128 and the last 382 of the 510 text tokens work best.
_HEAD_SHARE = (128, 510)
_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")


class BertTokenizer(tf.Module):
    """WordPiece tokenizer (`tokenize`) and BERT input packer (`pack`); `__call__` does both.

    Texts may be a str, a list/array of str, or a tf.string tensor of rank 0 or 1
    (a scalar is a batch of one). `tokenize` and `pack` are TensorFlow ops, so the
    tokenizer works eagerly, in `tf.data.Dataset.map`, in a `tf.function` and in a
    SavedModel; `pack_rows` is `pack` in NumPy, for features prepared in Python.
    """

    def __init__(self, vocab, lower_case: bool = True):
        super().__init__(name="bert_tokenizer")
        tokens = _read_vocab(vocab)
        missing = [t for t in _SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ConfigError(f"vocabulary lacks the special tokens {missing}")
        index = {t: i for i, t in enumerate(tokens)}
        self._tokens = tuple(tokens)
        self.vocab_size = len(tokens)
        self.lower_case = bool(lower_case)
        self.cls_id, self.sep_id = index["[CLS]"], index["[SEP]"]
        self.pad_id, self.unk_id = index["[PAD]"], index["[UNK]"]

        ops = _tf_text_ops()
        self._normalizer_model = _as_uint8(_normalizer_model(self.lower_case))
        # FastWordpiece limits words in bytes, not characters. The first model makes
        # every word of over 100 bytes [UNK]; the second lets all words of up to 100
        # characters (4 bytes at most each) through, for `_redo_unknown_rows`.
        self._wordpiece_model, self._wordpiece_long_model = (
            _as_uint8(ops.build_fast_wordpiece_model(
                list(tokens), max_bytes, "##", "[UNK]", False, False  # no_pretokenization, detokenization
            ))
            for max_bytes in (MAX_CHARS_PER_WORD, 4 * MAX_CHARS_PER_WORD)
        )
        # Per vocabulary id: does the piece start a word, and how many characters has it.
        self._starts_word = tf.constant([not t.startswith("##") for t in tokens])
        self._piece_chars = tf.constant(
            [len(t) - 2 if t.startswith("##") else len(t) for t in tokens], tf.int32
        )

    @property
    def vocab(self) -> list[str]:
        return list(self._tokens)

    def tokenize(self, texts) -> tf.RaggedTensor:
        """Word-piece ids, int32 [batch, (n)], without special tokens or truncation.

        Eager when called eagerly: its few ops run as fast so, and a tf.function's first call
        (trace and instantiation) cost 0.2 s per process (bench/RESULTS.md). Inside a graph
        (tf.data, tf.function, the SavedModel) its ops join that graph."""
        return self._tokenize_strings(_as_string_batch(texts))

    def pack(self, ids_a, ids_b=None, max_length=512, truncation="longest_first", head_tokens=None) -> dict:
        """Packs ids into `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, padded to the longest row.

        `ids_a`/`ids_b` are ragged [batch, (n)] ids, as from `tokenize` (so ids can be
        computed once, cached, and packed per batch). `max_length` counts the special
        tokens; None means no truncation. Strategies:

        - longest_first: drop tokens from the end of the longer segment, one at a
          time, from b on ties (Google's `_truncate_seq_pair`).
        - only_second: shorten b only; if a alone does not fit, b is left empty and
          a keeps its first tokens (for single texts: the same as head).
        - head / tail: keep the first / last tokens.
        - head+tail: keep the first `head_tokens` and the last ones that still fit
          (Sun et al. 2019); by default the head is round(budget * 128 / 510), i.e.
          128 + 382 for max_length=512.

        For pairs, head, tail and head+tail split the budget between a and b as
        longest_first does, then keep each segment's head/tail within its share;
        head+tail's default head scales to each segment's share, and `head_tokens`
        caps the head of each segment.
        Returns int32 `token_ids`, `segment_ids`, `padding_mask` of shape [batch, seq].
        """
        pair = ids_b is not None
        budget = _check_options(max_length, truncation, head_tokens, pair)
        a = _as_ragged_ids(ids_a)
        b = _as_ragged_ids(ids_b) if pair else None
        if pair and None not in (a.shape[0], b.shape[0]) and a.shape[0] != b.shape[0]:
            raise ConfigError(f"{a.shape[0]} first segments but {b.shape[0]} second segments")
        return _pack(a, b, budget, truncation, head_tokens, (self.cls_id, self.sep_id, self.pad_id))

    def pack_rows(self, ids_a, ids_b=None, max_length=512, truncation="longest_first", head_tokens=None):
        """`pack` in NumPy, without the padding: (flat token ids, flat segment ids, row lengths).

        The same rows as `pack` (the same closed forms); for Python-side features, where a graph's
        first call (0.1 s) and padding each chunk to its longest row only to strip it are waste."""
        pair = ids_b is not None
        budget = _check_options(max_length, truncation, head_tokens, pair)
        a = _values_and_splits(ids_a)
        b = _values_and_splits(ids_b) if pair else None
        if pair and len(a[1]) != len(b[1]):
            raise ConfigError(f"{len(a[1]) - 1} first segments but {len(b[1]) - 1} second segments")
        len_a = np.diff(a[1])
        len_b = np.zeros_like(len_a) if b is None else np.diff(b[1])
        keep_a, keep_b = _kept_lengths(len_a, len_b, budget, truncation, xp=np)
        b_start = keep_a + 2
        lengths = b_start if b is None else b_start + keep_b + 1
        row_start = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.full(row_start[-1], self.sep_id, np.int32)
        ids[row_start[:-1]] = self.cls_id
        segments = np.zeros(row_start[-1], np.int8)
        for part, keep, start in ((a, keep_a, np.ones_like(keep_a)), (b, keep_b, b_start)):
            if part is not None:
                row, position, values = _keep_numpy(*part, keep, _head_count(keep, truncation, head_tokens, xp=np))
                ids[row_start[row] + start[row] + position] = values
        if b is not None:  # segment 1 from b's first token to the final [SEP]
            in_b = np.arange(row_start[-1]) - np.repeat(row_start[:-1], lengths) >= np.repeat(b_start, lengths)
            segments[in_b] = 1
        return ids, segments, lengths

    def __call__(self, texts, pairs=None, max_length=512, truncation="longest_first", head_tokens=None) -> dict:
        """Tokenizes and packs: raw strings (and optional second strings) in, model inputs out."""
        _check_options(max_length, truncation, head_tokens, pairs is not None)  # before any work
        ids_b = None if pairs is None else self.tokenize(pairs)
        ids_a = self.tokenize(texts)
        return self.pack(ids_a, ids_b, max_length=max_length, truncation=truncation, head_tokens=head_tokens)

    def save_vocab(self, directory) -> Path:
        """Writes `directory/vocab.txt` (one token a line, in id order) and returns its path."""
        path = Path(directory) / "vocab.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(t + "\n" for t in self._tokens), encoding="utf-8")
        return path

    def _tokenize_strings(self, texts):
        normalized = _normalize(texts, self._normalizer_model)
        ids = _wordpiece(normalized, self._wordpiece_model)
        return tf.cond(
            tf.reduce_any(ids.flat_values == self.unk_id),
            lambda: self._redo_unknown_rows(ids, normalized),
            lambda: ids,
        )

    def _redo_unknown_rows(self, ids, normalized):
        """Tokenizes again, counting characters, the rows where a word became [UNK].

        A word of over 100 bytes may have 100 characters or fewer. That is rare, and
        counting characters would add a fifth to every call, so only these rows pay.
        """
        unknown = tf.where(ids.flat_values == self.unk_id)[:, 0]
        rows, _ = tf.unique(tf.searchsorted(ids.row_splits, unknown, side="right") - 1)
        redone = self._unk_long_words(_wordpiece(tf.gather(normalized, rows), self._wordpiece_long_model))
        n = ids.nrows()
        source = tf.tensor_scatter_nd_update(tf.range(n), rows[:, None], n + tf.range(tf.size(rows, tf.int64)))
        return tf.gather(tf.concat([ids, redone], axis=0), source)

    def _unk_long_words(self, ids):
        """Replaces the pieces of each word longer than 100 characters by one [UNK]."""
        flat = ids.flat_values
        starts = tf.gather(self._starts_word, flat)
        word = tf.cumsum(tf.cast(starts, tf.int32)) - 1
        word_chars = tf.math.segment_sum(tf.gather(self._piece_chars, flat), word)
        too_long = tf.gather(word_chars > MAX_CHARS_PER_WORD, word)
        replaced = ids.with_flat_values(tf.where(too_long, self.unk_id, flat))
        return tf.ragged.boolean_mask(replaced, ids.with_flat_values(starts | ~too_long))


def guess_lower_case(vocab: list[str]) -> bool:
    """True if no word piece has an upper-case letter (special tokens like [CLS] aside)."""
    return not any(t != t.lower() for t in vocab if not (t.startswith("[") and t.endswith("]")))


# --- packing helpers -------------------------------------------------------------


def _check_options(max_length, truncation, head_tokens, pair):
    """Validates the packing options; returns the token budget for the text (None: unlimited)."""
    if truncation not in TRUNCATION_STRATEGIES:
        raise ConfigError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATION_STRATEGIES)}")
    if head_tokens is not None:
        if truncation != "head+tail":
            raise ConfigError(f"head_tokens applies only to truncation='head+tail', not {truncation!r}")
        if not _is_int(head_tokens) or head_tokens < 0:
            raise ConfigError(f"head_tokens must be an integer >= 0, got {head_tokens!r}")
    if max_length is None:
        return None
    specials = 3 if pair else 2
    if not _is_int(max_length) or max_length < specials:
        raise ConfigError(f"max_length must be None or an integer >= {specials} (special tokens), got {max_length!r}")
    budget = int(max_length) - specials
    if head_tokens is not None and head_tokens > budget:
        raise ConfigError(f"head_tokens={head_tokens} is over the {budget} text tokens of max_length={max_length}")
    return budget


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@tf.function(reduce_retracing=True, autograph=False)
def _pack(a, b, budget, truncation, head_tokens, special_ids):
    """`BertTokenizer.pack` after its checks; a graph, since eager ragged ops are slow."""
    cls_id, sep_id, pad_id = special_ids
    len_a = a.row_lengths()
    len_b = tf.zeros_like(len_a) if b is None else b.row_lengths()
    keep_a, keep_b = _kept_lengths(len_a, len_b, None if budget is None else tf.constant(budget, tf.int64),
                                   truncation)

    # Row r is [CLS] a [SEP] or [CLS] a [SEP] b [SEP]: start from [CLS] and [SEP]s
    # over the row's length, then write the ids of a and b in their places.
    b_start = keep_a + 2
    length = b_start if b is None else b_start + keep_b + 1
    column = tf.range(tf.maximum(tf.reduce_max(length), 0))[None, :]
    padding_mask = column < length[:, None]
    token_ids = tf.where(column == 0, cls_id, tf.where(padding_mask, sep_id, pad_id))
    segment_ids = tf.zeros_like(padding_mask) if b is None else (column >= b_start[:, None]) & padding_mask
    for ids, keep, start in ((a, keep_a, tf.ones_like(keep_a)), (b, keep_b, b_start)):
        if ids is not None:
            row, position, values = _keep(ids, keep, _head_count(keep, truncation, head_tokens))
            where = tf.stack([row, tf.gather(start, row) + position], axis=1)
            token_ids = tf.tensor_scatter_nd_update(token_ids, where, values)
    return {
        "token_ids": token_ids,
        "segment_ids": tf.cast(segment_ids, tf.int32),
        "padding_mask": tf.cast(padding_mask, tf.int32),
    }


def _kept_lengths(len_a, len_b, budget, truncation, xp=tf):
    """How many tokens of a and of b each row keeps: all without a budget; only_second shortens b
    only; every other strategy splits the budget as longest_first does."""
    if budget is None:
        return len_a, len_b
    if truncation == "only_second":
        keep_a = xp.minimum(len_a, budget)
        return keep_a, xp.minimum(len_b, budget - keep_a)
    return _longest_first(len_a, len_b, budget, xp)


def _longest_first(len_a, len_b, budget, xp=tf):
    """Closed form of Google's `_truncate_seq_pair`: pop from the longer, from b on ties.

    Popping ends with the shorter segment whole if it fits in half the budget, and
    otherwise with a getting ceil(budget / 2) and b the rest.
    """
    keep_a = xp.minimum(len_a, xp.maximum((budget + 1) // 2, budget - len_b))
    fits = len_a + len_b <= budget
    return xp.where(fits, len_a, keep_a), xp.where(fits, len_b, budget - keep_a)


def _head_count(keep, truncation, head_tokens, xp=tf):
    """How many of the `keep` tokens of a segment come from its start."""
    if truncation == "tail":
        return xp.zeros_like(keep)
    if truncation != "head+tail":
        return keep
    if head_tokens is not None:
        return xp.minimum(keep, head_tokens)
    return (keep * 2 * _HEAD_SHARE[0] + _HEAD_SHARE[1]) // (2 * _HEAD_SHARE[1])  # rounded half up


def _keep(ids, keep, head):
    """The first `head` and last `keep - head` ids of each row: (row, position in the kept row, id)."""
    row = ids.value_rowids()
    position = tf.range(tf.size(row, tf.int64)) - tf.gather(ids.row_splits, row)
    head, dropped = tf.gather(head, row), tf.gather(ids.row_lengths() - keep, row)
    kept = tf.where((position < head) | (position >= head + dropped))[:, 0]
    position = tf.where(position < head, position, position - dropped)
    return tf.gather(row, kept), tf.gather(position, kept), tf.gather(ids.flat_values, kept)


def _keep_numpy(values, splits, keep, head):
    """`_keep` in NumPy on ragged rows (flat values as a tensor, NumPy row splits). Only what is kept
    comes out of the tensor: a chunk of long texts has many times more word pieces than its rows."""
    row = np.repeat(np.arange(len(keep)), keep)
    position = np.arange(len(row)) - np.repeat(np.cumsum(keep) - keep, keep)
    dropped = np.diff(splits) - keep
    source = splits[:-1][row] + np.where(position < head[row], position, position + dropped[row])
    return row, position, tf.gather(values, source).numpy()


# --- input conversion --------------------------------------------------------------


def _as_string_batch(texts):
    """A rank-1 tf.string tensor from a str, a sequence of str, an array or a tensor."""
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    if not isinstance(texts, tf.Tensor):
        try:
            texts = tf.convert_to_tensor(texts, dtype=tf.string)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"texts must be strings: {error}") from None
    if texts.dtype != tf.string:
        raise ConfigError(f"texts must be strings, got {texts.dtype.name}")
    if texts.shape.rank is not None and texts.shape.rank > 1:
        raise ConfigError(f"texts must be a string or a 1-D batch of strings, got shape {texts.shape}")
    return tf.reshape(texts, [-1])


def _values_and_splits(ids) -> tuple[tf.Tensor, np.ndarray]:
    """(flat int32 values, NumPy int64 row splits) of ids in any form `pack` takes."""
    ids = _as_ragged_ids(ids)
    return ids.flat_values, ids.row_splits.numpy()


def _as_ragged_ids(ids):
    """int32 ragged ids with int64 row splits, from ragged ids, a dense tensor (all ids real) or lists."""
    if isinstance(ids, tf.Tensor):
        ids = tf.RaggedTensor.from_tensor(ids)
    elif not isinstance(ids, tf.RaggedTensor):
        ids = tf.ragged.constant(ids, dtype=tf.int32, ragged_rank=1)
    return tf.cast(ids, tf.int32).with_row_splits_dtype(tf.int64)


def _read_vocab(vocab) -> list[str]:
    if isinstance(vocab, (str, Path)):
        path = Path(vocab)
        if not path.is_file():
            raise ConfigError(f"vocabulary file not found: {path}")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        tokens = [line.strip() for line in lines]  # as Google's load_vocab
    else:
        tokens = [str(t) for t in vocab]
    if not tokens:
        raise ConfigError("the vocabulary is empty")
    return tokens


def _as_uint8(buffer: bytes) -> tf.Tensor:
    # A uint8 tensor, as tf-text's own classes hold their models (its list() conversion is slow).
    return tf.constant(np.frombuffer(buffer, np.uint8))


class _TfTextOps:
    """The parts of tensorflow-text the tokenizer uses, loaded without `import tensorflow_text`.

    Importing the package loads all of its 22 op libraries (about 115 MB of RSS in every
    process, bench/RESULTS.md); the tokenizer needs two, plus the WordPiece model builder. The
    ops registered are tf-text's own, so exported SavedModels still load after
    `import tensorflow_text`, and importing it later in the same process is harmless.
    """

    def __init__(self):
        spec = importlib.util.find_spec("tensorflow_text")  # finds the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("bertfit's tokenizer needs tensorflow-text: pip install 'tensorflow-text==2.21.*'")
        root = Path(spec.submodule_search_locations[0])
        self.fast_bert_normalize = tf.load_op_library(
            str(root / "python" / "ops" / "_fast_bert_normalizer.so")).fast_bert_normalize
        self.fast_wordpiece_tokenize_with_offsets = tf.load_op_library(
            str(root / "python" / "ops" / "_fast_wordpiece_tokenizer.so")).fast_wordpiece_tokenize_with_offsets
        name = "tensorflow_text.core.pybinds.pywrap_fast_wordpiece_tokenizer_model_builder"
        if name not in sys.modules:  # registered under tf-text's name, so the package reuses it
            path = str(root / "core" / "pybinds" / "pywrap_fast_wordpiece_tokenizer_model_builder.so")
            loader = importlib.machinery.ExtensionFileLoader(name, path)
            module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
            loader.exec_module(module)
            sys.modules[name] = module
        self.build_fast_wordpiece_model = sys.modules[name].build_fast_wordpiece_model


_tf_text_ops = functools.cache(_TfTextOps)


def _normalize(texts: tf.Tensor, model: tf.Tensor) -> tf.Tensor:
    """Normalized texts [batch] (tf-text's FastBertNormalizer.normalize, with our table as model)."""
    normalized, _, _ = _tf_text_ops().fast_bert_normalize(
        input_values=texts, fast_bert_normalizer_model=model, get_offsets=False)
    return normalized


def _wordpiece(texts: tf.Tensor, model: tf.Tensor) -> tf.RaggedTensor:
    """int32 word-piece ids [batch, (n)] of normalized texts [batch] (tf-text's FastWordpieceTokenizer.tokenize)."""
    _, ids, row_splits, _, _ = _tf_text_ops().fast_wordpiece_tokenize_with_offsets(input_values=texts, wp_model=model)
    return tf.RaggedTensor.from_row_splits(tf.cast(ids, tf.int32), row_splits, validate=False)


# --- the normalizer table ------------------------------------------------------------
#
# FastBertNormalizer maps each code point through a darts-clone double-array trie
# keyed by the code point's UTF-8 bytes, whose value packs (offset, length) of the
# replacement in a string pool (layout in tensorflow-text's fast_bert_normalizer.h).
# Code points absent from the trie are kept as they are.

_DIFFERENT = 0x40000000  # value flag: the code point is replaced
_LEAF = 0x80000000  # unit flag: the unit holds a value
_HAS_LEAF = 0x100  # unit flag: the node ends a key


def _replacements(lower_case: bool) -> list[tuple[np.ndarray, str]]:
    """(code points, replacement) for the code points that BERT's normalization changes.

    That is `_clean_text` (drop NUL, U+FFFD and categories Cc, Cf, Co, except tab,
    newline and CR, which become spaces like the Zs spaces) and, when lower-casing,
    `lower` then NFD then dropping category Mn, applied to one character at a time.
    """
    # Two-letter categories of all code points, as an (n, 2) byte array.
    categories = np.frombuffer(
        "".join(map(unicodedata.category, map(chr, range(0x110000)))).encode("ascii"), np.uint8
    ).reshape(-1, 2)
    major, minor = categories[:, 0], categories[:, 1]
    space = (major == ord("Z")) & (minor == ord("s"))
    space[[0x09, 0x0A, 0x0D]] = True
    other = (major == ord("C")) & (minor != ord("n")) & ~space  # Cn, unassigned, stays
    other[0xD800:0xE000] = False  # surrogates (Cs) never occur in UTF-8
    other[0xFFFD] = True
    groups = [(np.flatnonzero(other), ""), (np.flatnonzero(space), " ")]
    if lower_case:
        mark = (major == ord("M")) & (minor == ord("n"))
        groups.append((np.flatnonzero(mark), ""))
        unassigned = (major == ord("C")) & (minor == ord("n"))  # neither lower-case nor decompose
        for cp in np.flatnonzero(~(other | space | mark | unassigned)).tolist():
            ch = chr(cp)
            if ch.lower() != ch or not unicodedata.is_normalized("NFD", ch):
                decomposed = unicodedata.normalize("NFD", ch.lower())
                groups.append((np.array([cp]), "".join(c for c in decomposed if unicodedata.category(c) != "Mn")))
    return groups


@functools.lru_cache(maxsize=2)
def _normalizer_model(lower_case: bool) -> bytes:
    """The FastBertNormalizerModel flatbuffer for BERT's normalization."""
    values = np.zeros(0x110000, np.int64)  # per code point: 0 = unchanged, else the encoded replacement
    pool, offsets = bytearray(), {}
    for code_points, replacement in _replacements(lower_case):
        data = replacement.encode("utf-8")
        if data not in offsets:
            offsets[data] = len(pool)
            pool += data
        values[code_points] = _DIFFERENT | offsets[data] << 6 | len(data)

    units = _double_array(values)
    builder = flatbuffers.Builder(4 * len(units) + len(pool) + 1024)
    pool_vector = builder.CreateNumpyVector(np.frombuffer(bytes(pool), np.uint8))
    trie_vector = builder.CreateNumpyVector(units)
    builder.StartObject(4)
    builder.PrependBoolSlot(0, lower_case, False)
    builder.PrependUOffsetTRelativeSlot(1, trie_vector, 0)
    builder.PrependInt32Slot(2, int(values[0]), 0)  # the trie cannot hold the empty key of U+0000
    builder.PrependUOffsetTRelativeSlot(3, pool_vector, 0)
    builder.Finish(builder.EndObject())
    return bytes(builder.Output())


def _double_array(values: np.ndarray) -> np.ndarray:
    """Darts-clone units for the trie of UTF-8 keys of the code points with a value.

    Identical subtrees are shared (all unassigned code points of a plane map alike),
    which keeps a million keys down to a few thousand nodes.
    """
    nodes = []  # unique nodes: ("leaf", value) or ("inner", ((byte, node), ...))
    ids = {}
    uniform = {}  # (continuation bytes, value) -> node, to skip rebuilding blocks mapped all alike

    def intern(node):
        if node not in ids:
            ids[node] = len(nodes)
            nodes.append(node)
        return ids[node]

    def subtree(first, continuation_bytes):
        """Node for the code points first .. first + 64**n - 1 that share their leading bytes."""
        block = values[first : first + 64**continuation_bytes]
        if not block.any():
            return None
        if continuation_bytes == 0:
            return intern(("leaf", int(block[0])))
        same = (block == block[0]).all()
        if same and (continuation_bytes, int(block[0])) in uniform:
            return uniform[continuation_bytes, int(block[0])]
        step = 64 ** (continuation_bytes - 1)
        children = ((0x80 | c, subtree(first + c * step, continuation_bytes - 1)) for c in range(64))
        node = intern(("inner", tuple((byte, n) for byte, n in children if n is not None)))
        if same:
            uniform[continuation_bytes, int(block[0])] = node
        return node

    root = [(cp, intern(("leaf", int(values[cp])))) for cp in range(1, 0x80) if values[cp]]
    # (lead bytes, bits of the code point in the lead byte, continuation bytes, valid range)
    for leads, lead_bits, n, low, high in (
        (range(0xC2, 0xE0), 0x1F, 1, 0x80, 0x7FF),
        (range(0xE0, 0xF0), 0x0F, 2, 0x800, 0xFFFF),
        (range(0xF0, 0xF5), 0x07, 3, 0x10000, 0x10FFFF),
    ):
        for lead in leads:
            children = []
            for c in range(0x80, 0xC0):  # the second byte rules out overlong forms, surrogates, > U+10FFFF
                first = (lead & lead_bits) << (6 * n) | (c & 0x3F) << (6 * (n - 1))
                if low <= first <= high and not 0xD800 <= first <= 0xDFFF:
                    child = subtree(first, n - 1)
                    if child is not None:
                        children.append((c, child))
            if children:
                root.append((lead, intern(("inner", tuple(children)))))
    root_id = intern(("inner", tuple(root)))
    return _place(nodes, root_id)


def _place(nodes, root_id) -> np.ndarray:
    """Lays the trie out in a double array, where node n's child by byte c sits at base(n) ^ c.

    Below the root, nodes branch on UTF-8 continuation bytes (0x80-0xBF), which
    differ in their low 6 bits only; so each inner node gets a 64-unit quarter of
    its own (base = quarter start ^ 0x80) and the root a block (base 256). The
    leaves' values fill the gaps: a leaf's value sits at its base. All bases differ,
    so a byte that a node lacks leads to a unit with another label, and no match.
    """
    base = [0] * len(nodes)
    occupied = {0}  # the root's own unit
    quarter = 8  # the first quarter after the root's block (block 1)
    for i, (kind, payload) in enumerate(nodes):
        if kind == "leaf":
            continue
        if i == root_id:
            base[i] = 256
        else:
            base[i] = quarter * 64 ^ 0x80
            quarter += 1
        occupied.update(base[i] ^ byte for byte, _ in payload)
    taken = occupied | set(base)
    spare = (p for p in range(1, 1 << 21) if p not in taken)
    for i, (kind, _) in enumerate(nodes):
        if kind == "leaf":
            base[i] = next(spare)

    units = np.zeros(max(base + list(occupied)) + 1, np.uint32)
    assert len(units) < 1 << 21, "offsets beyond 21 bits need darts-clone's extended form"
    units[0] = base[root_id] << 10
    for i, (kind, payload) in enumerate(nodes):
        if kind == "leaf":
            units[base[i]] = payload | _LEAF
            continue
        for byte, child in payload:
            position = base[i] ^ byte
            has_leaf = _HAS_LEAF if nodes[child][0] == "leaf" else 0
            units[position] = byte | has_leaf | (position ^ base[child]) << 10
    return units
