"""Stream a data file of any size (or stdin) through a classifier into JSONL or CSV (a file, or
stdout), with bounded memory."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import BertfitError

CHUNK = 4096  # rows held in memory at a time


def format_of_output(output_path, given=None) -> str:
    """jsonl or csv: as given, else from the output file's suffix (stdout: jsonl)."""
    if given:
        return given
    return "csv" if output_path and str(output_path).lower().endswith(".csv") else "jsonl"


class _Rows:
    """Writes one answer per input row: {where, kept columns, label, probabilities} as JSONL, or as CSV
    columns where, kept columns, label, then one probability column per label (multi-label: labels
    joined by ';')."""

    def __init__(self, stream, kind, where_key, labels, kept_names=()):
        self.stream, self.kind, self.where_key, self.labels = stream, kind, where_key, labels
        own = [where_key, "label", *((f"p_{name}" for name in labels) if kind == "csv" else ["probabilities"])]
        taken = [name for name in kept_names if name in own]
        if taken:
            raise BertfitError(f"--keep-columns {','.join(taken)}: the output has its own {taken[0]!r} field; "
                               "rename the column in the input")
        if kind == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow([where_key, *kept_names, "label", *(f"p_{name}" for name in labels)])

    def write(self, where, label, row, kept=None):
        kept = kept or {}
        if self.kind == "csv":
            self.csv.writerow([where, *(_csv_cell(v) for v in kept.values()),
                               ";".join(label) if isinstance(label, list) else label,
                               *(f"{float(p):.6g}" for p in row)])
        else:
            self.stream.write(json.dumps({self.where_key: where, **kept, "label": label,
                                          "probabilities": dict(zip(self.labels, map(float, row)))},
                                         ensure_ascii=False, default=str) + "\n")


def _csv_cell(value):
    """A kept value in a CSV cell: missing as empty, lists and objects as JSON, others as text."""
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (list, dict)) else value


@contextlib.contextmanager
def _spooled(raw, name, fmt):
    """A stream (stdin, a pipe), spooled to a temporary file named NAME.FORMAT (the readers need a file
    they can read twice; the name appears in messages). The format: as given, else jsonl when the first
    character is '{', tsv when the first line has a tab, else csv."""
    with tempfile.TemporaryDirectory(prefix="bertfit-stdin-") as folder:
        head = raw.read(64 * 1024)
        if fmt is None:
            first = head.lstrip()[:1]
            fmt = "jsonl" if first == b"{" else "tsv" if b"\t" in head.split(b"\n", 1)[0] else "csv"
        path = Path(folder) / f"{name}.{fmt}"
        with open(path, "wb") as f:
            f.write(head)
            shutil.copyfileobj(raw, f)
        yield path


@contextlib.contextmanager
def spooled_stream(path, fmt=None):
    """"-" (stdin) or a named pipe (<(zcat data.csv.gz)), read once into a temporary file (see _spooled)."""
    if str(path) == "-":
        with _spooled(sys.stdin.buffer, "stdin", fmt) as spooled:
            yield spooled
    else:
        with open(path, "rb") as raw, _spooled(raw, Path(path).name, fmt) as spooled:
            yield spooled


def predict_file(clf, input_path, output_path=None, batch_size=64, output_format=None, keep_columns=None,
                 **read_options) -> int:
    """Write one answer per input row, in order, naming its "line"|"row"|"record"|"file": to output_path
    (JSONL, or CSV for a .csv name or output_format="csv"; the file appears only when complete) or, when
    output_path is None, to stdout as the answers come. input_path "-" reads stdin. keep_columns: input
    columns (names, or 0-based indexes without a header; a list or "id,source") copied into each answer.
    A pipe (--input <(zcat new.csv.gz)) is read once, like stdin."""
    keep_columns = keep_columns or None
    if str(input_path) == "-" or Path(input_path).is_fifo():  # a pipe, e.g. --input <(zcat new.csv.gz)
        with spooled_stream(input_path, read_options.pop("format", None)) as path:
            return predict_file(clf, path, output_path, batch_size, output_format, keep_columns, **read_options)
    kind = format_of_output(output_path, output_format)
    if output_path is None:
        return _predict_rows(clf, input_path, sys.stdout, kind, batch_size, keep_columns, read_options)
    output_path = Path(output_path)
    if output_path.exists() and output_path.resolve() == Path(input_path).resolve():
        raise BertfitError(f"--output {output_path} is the input file: choose another name")
    tmp = output_path.with_name(f".{output_path.name}.tmp{os.getpid()}")
    try:
        out_file = open(tmp, "w", encoding="utf-8", newline="")
    except OSError as e:  # a missing folder, a read-only mount, no permission
        raise BertfitError(f"cannot write --output {output_path}: {e.strerror}") from None
    try:
        with out_file as f:
            count = _predict_rows(clf, input_path, f, kind, batch_size, keep_columns, read_options)
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


def prediction_options(saved: dict, given: dict, input_path) -> dict:
    """How an input to predict is read: the run's reading options (saved) under those given, without labels."""
    from .data import input_options

    options = {**input_options(saved, given, input_path), "require_labels": False}
    for key in ("label_column", "label_columns", "label_delimiter", "label_names"):
        options.pop(key, None)
    return options


def _predict_rows(clf, input_path, stream, kind, batch_size, keep_columns, read_options) -> int:
    from .data import iter_examples, unit_of

    options = prediction_options(clf.data_config.read_options(), read_options, input_path)
    # Each answer names its input as errors and reports do: the line where the row starts (csv, tsv,
    # jsonl), the row or record number (parquet, tfrecord), or the file (folders).
    where_key = unit_of(input_path, options["format"])
    rows = None if keep_columns else _Rows(stream, kind, where_key, clf.labels)
    count = 0
    wheres, texts, pairs, kept = [], [], [], []

    def flush():
        nonlocal count
        probs = clf.predict_features(clf.encode(texts, pairs if any(p is not None for p in pairs) else None),
                                     batch_size=batch_size)
        for where, label, row, values in zip(wheres, clf.decide(probs), probs, kept or [None] * len(texts)):
            rows.write(where, label, row, values)
        stream.flush()
        count += len(texts)
        for held in (wheres, texts, pairs, kept):
            held.clear()

    for where, text, pair, _, *values in iter_examples(input_path, keep_columns=keep_columns, **options):
        if rows is None:  # the kept columns' names are known once the file's header is read
            rows = _Rows(stream, kind, where_key, clf.labels, list(values[0]))
        wheres.append(where)
        texts.append(text)
        pairs.append(pair)
        kept.extend(values)
        if len(texts) >= CHUNK:
            flush()
    if texts:
        flush()
    return count
