"""Pieces every converter shares: the reader result, vocabularies, configs, atomic writes, checks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..config import EncoderConfig
from ..errors import CheckpointError, ConfigError
from ..modeling import canonical_shapes, check_canonical

HEAD = ("classifier/kernel", "classifier/bias")


class Checkpoint(NamedTuple):
    """What every reader returns: no Keras model is built."""

    config: EncoderConfig
    weights: dict[str, np.ndarray]  # canonical names, plus HEAD when the checkpoint has a task head
    vocab: list[str]
    lower_case: bool | None  # None: the checkpoint does not say
    meta: dict[str, Any]  # format, source, labels, ignored tensor names, ...


# -- files ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name beside `path`, moved into place only if the block succeeds,
    so that a killed write never leaves a file that looks complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # like any file the user writes, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a write to an open file (a full disk) does not name it
        raise


def write_text(path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_vocab(path) -> list[str]:
    """One token a line; ids are line numbers, so nothing but the line end is stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: vocabulary file not found") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def write_vocab(path, vocab: list[str]):
    write_text(path, "".join(token + "\n" for token in vocab))


def config_from_json(path) -> EncoderConfig:
    """EncoderConfig from a Hugging Face `config.json` or Google `bert_config.json`."""
    try:
        return EncoderConfig.from_bert_json(read_json(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def casing_from_name(name: str) -> bool | None:
    """Google names its folders `uncased_L-12_H-768_A-12`, `cased_...`, `multi_cased_...`."""
    name = name.lower()
    if re.search(r"(^|[^a-z])uncased", name):
        return True
    if re.search(r"(^|[^a-z])cased", name):
        return False
    return None


# -- tensors -------------------------------------------------------------------------


def merge_head_axes(weights: dict[str, np.ndarray], config: EncoderConfig):
    """Reshape attention tensors stored per head ([hidden, heads, head_size] and the like,
    as Keras EinsumDense keeps them) to the canonical 2-D/1-D shapes.

    Only a change of rank is reshaped: a same-rank mismatch (a transposed kernel, say) is
    a real error and is left for check_canonical to report."""
    for name, shape in canonical_shapes(config).items():
        arr = weights.get(name)
        if arr is not None and arr.ndim != len(shape) and arr.size == int(np.prod(shape)):
            weights[name] = arr.reshape(shape)


def finish(config: EncoderConfig, weights: dict[str, np.ndarray], vocab: list[str], lower_case: bool | None,
           *, source: str, vocab_source: str, meta: dict) -> Checkpoint:
    """Validate a converted checkpoint and cast it to float32.

    A missing pooler is the one gap that is filled (as Hugging Face does, with a warning):
    checkpoints saved from masked-LM models have none, and fine-tuning learns it anyway."""
    pooler = ("pooler/dense/kernel", "pooler/dense/bias")
    if not any(k in weights for k in pooler) and "embeddings/word_embeddings" in weights:
        h = config.hidden_size
        rng = np.random.default_rng(0)
        weights[pooler[0]] = np.clip(rng.normal(0, 0.02, (h, h)), -0.04, 0.04).astype("float32")
        weights[pooler[1]] = np.zeros(h, "float32")
        meta["initialized"] = list(pooler)
        warnings.warn(f"{source}: no pooler in the checkpoint; pooler/dense is newly initialized", stacklevel=3)
    check_canonical(weights, config, source)
    if any(k in weights for k in HEAD):
        if not all(k in weights for k in HEAD):
            missing = next(k for k in HEAD if k not in weights)
            raise CheckpointError(f"{source}: tensor {missing!r} is missing (the classifier head is incomplete)")
        kernel, bias = weights[HEAD[0]], weights[HEAD[1]]
        if kernel.ndim != 2 or kernel.shape[0] != config.hidden_size or bias.shape != (kernel.shape[1],):
            raise CheckpointError(
                f"{source}: classifier/kernel {kernel.shape} and classifier/bias {bias.shape} do not fit "
                f"hidden size {config.hidden_size} ([hidden, labels] and [labels] expected)")
    rows = weights["embeddings/word_embeddings"].shape[0]
    # Fewer tokens than rows is harmless (some checkpoints pad the table to a multiple of 8);
    # more would give token ids past the end of the embedding table.
    if len(vocab) > rows:
        raise CheckpointError(
            f"{vocab_source}: the vocabulary has {len(vocab)} tokens but the word embeddings "
            f"(embeddings/word_embeddings) have {rows} rows; the vocabulary does not belong to this checkpoint")
    if not vocab:
        raise CheckpointError(f"{vocab_source}: the vocabulary is empty")
    keep = set(canonical_shapes(config)) | set(HEAD)
    out = {k: np.ascontiguousarray(v, dtype="float32") for k, v in weights.items() if k in keep}
    return Checkpoint(config, out, vocab, lower_case, meta)
