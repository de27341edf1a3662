"""Tokenize once, cache the ids, and cut length-bucketed batches padded only to their longest row.

A *row* is one model input. Normally a row is one example; with `long_text="window"` a long
text becomes several overlapping rows whose predictions are averaged back per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

ENCODE_CHUNK = 2048  # texts per tokenizer call: large enough to amortise the call


@dataclass
class Features:
    """Rows stored end to end in flat arrays: no padding and no Python object per row (5 bytes per
    token, 8 per row), and ready to be memory-mapped."""

    ids: np.ndarray            # int32: every row's token ids, [CLS] ... [SEP], one row after another
    segments: np.ndarray       # int8: the segment id of each of those tokens
    offsets: np.ndarray        # int64 [rows + 1]: row r is ids[offsets[r]:offsets[r + 1]]
    example_index: np.ndarray  # row -> index of its example
    num_examples: int

    @classmethod
    def from_rows(cls, ids: list[np.ndarray], segments: list[np.ndarray], lengths: list[np.ndarray],
                  example_index, num_examples) -> "Features":
        """From pieces: flat ids and segments of consecutive rows, and those rows' lengths."""
        flat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        return cls(flat(ids, np.int32), flat(segments, np.int8), _offsets(lengths), np.asarray(example_index),
                   num_examples)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows_of(self, examples) -> np.ndarray:
        """The rows of these examples (indices, in order), in row order."""
        return np.flatnonzero(np.isin(self.example_index, examples))

    def select(self, examples) -> "Features":
        """A copy in memory holding only these examples (indices, in order), renumbered 0, 1, ..."""
        rows = self.rows_of(examples)
        lengths = self.lengths[rows]
        offsets = _offsets([lengths])
        # each kept token's position in the flat arrays: its row's start + its place in the row
        where = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        renumber = np.full(self.num_examples, -1, np.int64)
        renumber[np.asarray(examples, np.int64)] = np.arange(len(examples))
        return Features(np.asarray(self.ids[where]), np.asarray(self.segments[where]), offsets,
                        renumber[self.example_index[rows]], len(examples))

    def row(self, r: int) -> np.ndarray:
        return self.ids[self.offsets[r]:self.offsets[r + 1]]

    def __len__(self):
        return len(self.offsets) - 1


def _offsets(lengths: list[np.ndarray]) -> np.ndarray:
    """Row start positions [rows + 1] from pieces of consecutive row lengths."""
    offsets = np.zeros(sum(map(len, lengths)) + 1, np.int64)
    np.cumsum(np.concatenate(lengths) if lengths else [], out=offsets[1:])
    return offsets


def encode_options(config) -> dict:
    """encode's keyword arguments from a TrainConfig."""
    return dict(max_length=config.max_length, truncation=config.truncation, head_tokens=config.head_tokens,
                long_text=config.long_text, stride=config.window_stride)


def encode(tokenizer, texts, pairs=None, *, max_length=128, truncation="longest_first", head_tokens=None,
           long_text="truncate", stride=None) -> Features:
    """Tokenize all texts (in chunks) into rows ready for batching."""
    if long_text not in ("truncate", "window"):
        raise ConfigError(f"long_text must be 'truncate' or 'window', not {long_text!r}")
    texts = list(texts)
    if long_text == "window":
        if pairs is not None:
            raise ConfigError("long_text='window' supports single texts, not sentence pairs")
        return _windows(tokenizer, texts, max_length, stride)
    ids, segments, lengths = [], [], []
    for start in range(0, len(texts), ENCODE_CHUNK):
        a = tokenizer.tokenize(texts[start:start + ENCODE_CHUNK])
        b = None if pairs is None else tokenizer.tokenize(list(pairs[start:start + ENCODE_CHUNK]))
        for parts, part in zip((ids, segments, lengths), tokenizer.pack_rows(
                a, b, max_length=max_length, truncation=truncation, head_tokens=head_tokens)):
            parts.append(part)
    return Features.from_rows(ids, segments, lengths, np.arange(len(texts)), len(texts))


def encode_file(tokenizer, path, read_options: dict, directory, **encode_options) -> tuple[list, Features]:
    """Stream a data file through the tokenizer into flat files in `directory`, memory-mapped when done.

    For training data of any size: only one chunk of texts is in memory at a time; what stays is
    each example's label (one shared object per distinct label) and 8 bytes per row of offsets.
    Returns (labels, features), the same as read_examples + encode would give.
    """
    from .data import iter_examples, uniform_labels

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    labels, shared = [], {}
    lengths, example_index, count = [], [], 0
    with open(directory / "ids.int32", "wb") as ids, open(directory / "segments.int8", "wb") as segments:
        def add(texts, pairs):
            nonlocal count
            f = encode(tokenizer, texts, pairs if pairs[0] is not None else None, **encode_options)
            ids.write(f.ids.tobytes())
            segments.write(f.segments.tobytes())
            lengths.append(f.lengths)
            example_index.append(f.example_index + count)
            count += f.num_examples

        texts, pairs = [], []
        for _, text, pair, label in iter_examples(path, **read_options):
            texts.append(text)
            pairs.append(pair)
            labels.append(shared.setdefault(tuple(label) if isinstance(label, list) else label, label))
            if len(texts) == ENCODE_CHUNK:
                add(texts, pairs)
                texts, pairs = [], []
        if texts:
            add(texts, pairs)
    labels = uniform_labels(labels)

    def mapped(name, dtype):
        size = (directory / name).stat().st_size
        return np.memmap(directory / name, dtype, mode="r") if size else np.zeros(0, dtype)

    features = Features(mapped("ids.int32", np.int32), mapped("segments.int8", np.int8), _offsets(lengths),
                        np.concatenate(example_index), count)
    return labels, features


def _windows(tokenizer, texts, max_length, stride) -> Features:
    """Overlapping windows of max_length-2 word pieces, `stride` apart (default: half a window)."""
    if max_length is None or max_length < 3:
        raise ConfigError("long_text='window' needs max_length of at least 3")
    width = max_length - 2
    stride = stride or max(1, width // 2)
    if not 0 < stride <= width:
        raise ConfigError(f"window stride must be between 1 and {width} (max_length - 2), not {stride}")
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    rows, example_index = [], []
    for start in range(0, len(texts), ENCODE_CHUNK):
        ragged = tokenizer.tokenize(texts[start:start + ENCODE_CHUNK])
        for offset, pieces in enumerate(ragged.numpy()):
            pieces = np.asarray(pieces, "int32")
            starts = range(0, max(1, len(pieces) - width + stride), stride)
            for s in starts:
                rows.append(np.concatenate([[cls], pieces[s:s + width], [sep]]).astype("int32"))
                example_index.append(start + offset)
    lengths = [np.fromiter(map(len, rows), np.int64, len(rows))]
    return Features.from_rows(rows, [np.zeros(int(lengths[0].sum()), np.int8)], lengths, example_index, len(texts))


def batch_plan(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
               group: int = 50, max_scores: int | None = None, length_step: int = 1) -> list[np.ndarray]:
    """Row indices of each batch.

    Training (shuffle=True): a seeded shuffle, then rows sorted by length inside groups of
    `group` batches, then the batch order shuffled: batches hold rows of similar length (little
    padding) while every epoch still sees a different mix. Inference: sorted by length, and with
    `max_scores`, batches of long rows shrink so that rows x length^2 stays within it (the length
    rounded up to a multiple of `length_step`, as pad_batch will pad it).
    """
    n = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        if not max_scores:
            return [order[i:i + batch_size] for i in range(0, n, batch_size)]
        batches, i = [], 0
        while i < n:  # longest first: each batch as large as the score budget allows
            rows = rows_within(max_scores, padded_length(int(lengths[order[i]]), length_step), batch_size)
            batches.append(order[i:i + rows])
            i += rows
        return batches
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    span = batch_size * group
    for i in range(0, n, span):
        chunk = order[i:i + span]
        order[i:i + span] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def rows_within(max_scores: int | None, length: int, batch_size: int) -> int:
    """The most rows of `length` (at least 1, at most batch_size) whose rows x length^2 fit max_scores."""
    return batch_size if not max_scores else max(1, min(batch_size, max_scores // length ** 2))


def padded_length(longest: int, step: int = 1, cap: int | None = None) -> int:
    """`longest` rounded up to a multiple of `step`, but not beyond `cap` (the model's positions)."""
    length = -(-max(1, longest) // step) * step
    return max(longest, min(length, cap)) if cap else length


def pad_batch(features: Features, rows: np.ndarray, pad_id: int = 0, length_step: int = 1,
              max_positions: int | None = None) -> dict[str, np.ndarray]:
    """Pad the given rows to the longest of them, rounded up to a multiple of `length_step`
    (at most `max_positions`)."""
    rows = np.asarray(rows)
    starts = features.offsets[rows]
    lengths = features.offsets[rows + 1] - starts
    mask = np.arange(padded_length(int(lengths.max()), length_step, max_positions)) < lengths[:, None]
    where = (starts[:, None] + np.arange(mask.shape[1]))[mask]  # each kept position's index in the flat arrays
    token_ids = np.full(mask.shape, pad_id, "int32")
    token_ids[mask] = features.ids[where]
    segment_ids = np.zeros(mask.shape, "int32")
    segment_ids[mask] = features.segments[where]
    return {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": mask.astype("int32")}


def per_example(row_values: np.ndarray, features: Features) -> np.ndarray:
    """Average row outputs (e.g. probabilities of windows) back to one value per example."""
    if len(features) == features.num_examples:
        out = np.empty_like(row_values)
        out[features.example_index] = row_values
        return out
    sums = np.zeros((features.num_examples,) + row_values.shape[1:], row_values.dtype)
    np.add.at(sums, features.example_index, row_values)
    counts = np.bincount(features.example_index, minlength=features.num_examples)
    return sums / counts.reshape((-1,) + (1,) * (row_values.ndim - 1))
