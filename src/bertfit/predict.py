"""Stream a data file of any size through a classifier into JSONL, with bounded memory."""

from __future__ import annotations

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
    from .data import detect_format, iter_examples

    if not output_path:
        raise BertfitError("--input needs --output FILE.jsonl")
    output_path = Path(output_path)
    if output_path.exists() and output_path.resolve() == Path(input_path).resolve():
        raise BertfitError(f"--output {output_path} is the input file: choose another name")
    options = {**clf.data_config.read_options(), **read_options, "require_labels": False}
    for key in ("label_column", "label_columns", "label_delimiter", "label_names"):
        options.pop(key, None)
    # The run's reading options fit files like its training data. An input of another format (given
    # with --format, or told by its name) keeps only the columns, and a folder not even those.
    saved_format = clf.data_config.format
    input_format = read_options.get("format") or _format_from_name(input_path) or saved_format
    if saved_format and input_format != saved_format:
        for key in ("header", "quoting"):
            options[key] = read_options.get(key)
    if input_format == "folder":
        options.pop("text_column", None)
        options.pop("pair_column", None)
    options["format"] = input_format
    where_key = WHERE.get(input_format or detect_format(input_path), "line")
    tmp = output_path.with_name(f".{output_path.name}.tmp{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _format_from_name(path):
    from .data import DataError, detect_format

    try:
        return detect_format(path)
    except DataError:  # no such file (iter_examples says so), or a name that does not tell
        return None
