"""Stream a data file of any size through a classifier into JSONL, with bounded memory."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .errors import BertfitError

CHUNK = 4096  # rows held in memory at a time


# Each output line says which input it answers: the line where the row starts (csv, tsv, jsonl),
# the row or record number (parquet, tfrecord), or the file (folders).
WHERE = {"csv": "line", "tsv": "line", "jsonl": "line", "parquet": "row", "tfrecord": "record", "folder": "file"}


def predict_file(clf, input_path, output_path, batch_size=64, **read_options) -> int:
    """Write one {"line"|"row"|"record"|"file", "label", "probabilities"} line per input row, in order;
    the output appears only when complete."""
    from .data import detect_format, input_options, iter_examples

    if not output_path:
        raise BertfitError("--input needs --output FILE.jsonl")
    output_path = Path(output_path)
    if output_path.exists() and output_path.resolve() == Path(input_path).resolve():
        raise BertfitError(f"--output {output_path} is the input file: choose another name")
    options = {**input_options(clf.data_config.read_options(), read_options, input_path), "require_labels": False}
    for key in ("label_column", "label_columns", "label_delimiter", "label_names"):
        options.pop(key, None)
    where_key = WHERE[options["format"] or detect_format(input_path)]
    tmp = output_path.with_name(f".{output_path.name}.tmp{os.getpid()}")
    count = 0
    try:
        out_file = open(tmp, "w", encoding="utf-8")
    except OSError as e:  # a missing folder, a read-only mount, no permission
        raise BertfitError(f"cannot write --output {output_path}: {e.strerror}") from None
    try:
        with out_file as f:
            wheres, texts, pairs = [], [], []

            def flush():
                nonlocal count
                probs = clf.predict_features(clf.encode(texts, pairs if any(p is not None for p in pairs) else None),
                                             batch_size=batch_size)
                for where, label, row in zip(wheres, clf.decide(probs), probs):
                    f.write(json.dumps({where_key: where, "label": label,
                                        "probabilities": dict(zip(clf.labels, map(float, row)))},
                                       ensure_ascii=False) + "\n")
                count += len(texts)
                for held in (wheres, texts, pairs):
                    held.clear()

            for where, text, pair, _ in iter_examples(input_path, **options):
                wheres.append(where)
                texts.append(text)
                pairs.append(pair)
                if len(texts) >= CHUNK:
                    flush()
            if texts:
                flush()
        os.replace(tmp, output_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EISDIR):
            raise BertfitError(f"cannot write --output {output_path}: {e.strerror}") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
