"""Data readers: a file or folder in any common layout -> Examples (text, optional pair, label).

Formats: csv, tsv, jsonl, parquet, tfrecord (tf.train.Example) and folder (DIR/<label>/<file>, also
read straight from a tar archive: ARCHIVE.tar.gz/inner/folder). Text formats may be gzip-compressed.
From Python, data may also be in memory: a pandas DataFrame, a dict of equal-length columns, or a
tf.data.Dataset (see _dataset_columns for the element structures it may have).
Every problem a user can fix raises DataError naming the file and the line (1-based, as an editor
shows it), row, record, column or field. Also here: the label vocabulary and a stratified split.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import gzip
import json
import math
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np

from .config import option as opt
from .errors import DataError

FORMATS = ("csv", "tsv", "jsonl", "parquet", "folder", "tfrecord")
_SUFFIX_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet", ".tfrecord": "tfrecord", ".tfrecords": "tfrecord",
}
_TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)
_DEFAULT_TEXT = ("text", "sentence")  # tried in this order when no text column is given
_DEFAULT_LABEL = "label"
MAX_LINE_BYTES = 64 << 20  # longer than any text a BERT reads whole (an IMDB review is ~10 KB)
_HEADER_SAMPLE = 50  # rows looked at to tell a header from data when columns are given by index


@dataclass
class Examples:
    """Parallel lists, one entry per example, in file order."""

    texts: list[str]
    pairs: list[str] | None  # second sentence for pair tasks
    labels: list | None  # each a str (single-label) or list[str] (multi-label); None without labels
    source: str  # path as given, for messages
    # Where each example is in its source, counted as iter_examples counts (unit "line", "row", "record",
    # "file", ...): the one numbering that errors, reports and predict output share. None: unknown.
    where: list | None = None
    unit: str | None = None

    def __len__(self):
        return len(self.texts)

    def subset(self, indices) -> "Examples":
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return Examples(pick(self.texts), pick(self.pairs), pick(self.labels), self.source, pick(self.where), self.unit)

    def place(self, i) -> str:
        """Example i for a message: "data.csv, line 19", a folder's file path, or "data: example 3"."""
        return place(self.source, self.unit, None if self.where is None else self.where[i], i)


def place(source, unit, where, i) -> str:
    if where is None:
        return f"{source or 'the data'}: example {i + 1}"
    return str(where) if unit == "file" else f"{source}, {unit} {where}"


def unit_of(data, format=None) -> str:
    """What iter_examples' `where` counts for this data: line (csv, tsv, jsonl: the physical line where
    the row starts), row (parquet), record (tfrecord), file (folders: its path), or for data in memory
    index (a DataFrame's index label), position (a dict of lists, 0-based) and element (a tf.data.Dataset)."""
    if is_table(data):
        return "element" if is_dataset(data) else "position" if isinstance(data, dict) else "index"
    return _UNITS[format or detect_format(data)]


_UNITS = {"csv": "line", "tsv": "line", "jsonl": "line", "parquet": "row", "tfrecord": "record", "folder": "file"}


# ---------------------------------------------------------------------------------------------
# Format detection


def _archive_parts(path) -> tuple[Path, str] | None:
    """ARCHIVE.tar.gz/inner/dir -> (ARCHIVE.tar.gz, "inner/dir"); None when the path is in no tar archive."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_file() and _TAR_NAME.search(candidate.name):
                inner = path.relative_to(candidate).as_posix()
                return candidate, "" if inner == "." else inner
            return None
    return None


def is_table(data) -> bool:
    """In-memory data from the Python API: a pandas DataFrame, a dict of columns or a tf.data.Dataset."""
    return isinstance(data, dict) or (hasattr(data, "columns") and hasattr(data, "iloc")) or is_dataset(data)


def is_dataset(data) -> bool:
    """A tf.data.Dataset, told without importing TensorFlow."""
    return hasattr(data, "element_spec") and hasattr(data, "as_numpy_iterator")


def _table_name(table) -> str:
    if is_dataset(table):
        return "tf.data.Dataset"
    return "dict of columns" if isinstance(table, dict) else type(table).__name__


def detect_format(path) -> str:
    """The format of a data file or folder, from its name: csv|tsv|jsonl|parquet|folder|tfrecord."""
    p = Path(path)
    if p.is_dir() or _archive_parts(p):
        return "folder"
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    name = p.name.lower().removesuffix(".gz")
    fmt = _SUFFIX_FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the file name; pass {opt('format')} (one of {', '.join(FORMATS)})"
        )
    return fmt


COLUMN_OPTIONS = ("text_column", "pair_column", "label_column", "label_columns", "label_delimiter", "label_names")


def input_options(saved: dict, given: dict, path) -> dict:
    """Reading options for a new input to a trained run: the run's own (`saved`), under those given.

    The run's settings fit files like its training data. An input of another format (given, or told
    by its name) keeps the run's columns but not its header or quoting; a folder keeps no columns
    (text and label come from its layout) unless they were given, which iter_examples refuses.
    """
    try:
        named = "table" if is_table(path) else detect_format(path)
    except DataError:  # no such file, or a name that does not tell: iter_examples reports it
        named = None
    fmt = given.get("format") or named or saved.get("format")
    options = {**saved, **given, "format": fmt}
    if saved.get("format") and fmt != saved.get("format"):
        for key in ("header", "quoting"):
            options[key] = given.get(key)
    if fmt == "folder":
        for key in COLUMN_OPTIONS:
            options[key] = given.get(key)
    return options


# ---------------------------------------------------------------------------------------------
# Low-level readers: each yields (number, row), row a list of fields or a dict of named values


def _is_gzip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _decode(data: bytes, encoding, where, part="line") -> str:
    """Decode with the first of the comma-separated encodings that fits ("utf-8,latin-1" falls back)."""
    error = None
    for name in encoding.split(","):
        try:
            return data.decode(name.strip())
        except UnicodeDecodeError as e:
            error = error or e
    if part == "file":
        line = data.count(b"\n", 0, error.start) + 1
        where, part = f"{where}, line {line}", "line"
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    raise DataError(
        f"{where}: bytes {data[error.start:error.end]!r} (byte {column} of the {part}) are not valid "
        f"{encoding}; pass {opt('encoding')} with the file's encoding (e.g. {opt('encoding', 'cp1252')}), or a "
        f"fallback ({opt('encoding', 'utf-8,latin-1')} decodes what is not UTF-8 as latin-1)"
    )


def _lines(path, encoding):
    """(line number, decoded line) for each physical line of a text file, gzip or not."""
    try:
        f = gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
    number = 0
    with f:
        # Decode line by line, not through a text wrapper, so that a bad byte gets its line number.
        # (Splitting on b"\n" first is right for UTF-8 and the single-byte encodings, not for UTF-16.)
        try:
            # Read with a bound: a file with no line break (a binary file, a stream of zeros) would
            # otherwise be read whole into one line.
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}, line {number}: over {MAX_LINE_BYTES >> 20} MiB without a line break: "
                                    "not a text file of rows (check the file, or --format)")
                if number == 1 and b"\r" in raw.rstrip(b"\r\n"):
                    raise DataError(f"{path}: its lines end in a carriage return alone (classic Mac OS), which "
                                    "this reader does not split on: convert them to newlines, e.g. "
                                    f"tr '\\r' '\\n' < {path} > fixed{Path(str(path)).suffix}")
                line = _decode(raw, encoding, f"{path}, line {number}")
                yield number, line.removeprefix("\ufeff") if number == 1 else line  # UTF-8 BOM (MRPC, Excel)
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt gzip stream
            raise DataError(f"{path}, line {number + 1}: cannot read the compressed file ({e})") from None


def _csv_rows(path, lines, delimiter):
    """(first line number, fields) per record of a CSV-quoted file; a quoted field may span lines."""
    csv.field_size_limit(2**31 - 1)  # long documents (IMDB reviews) exceed the 128 KiB default
    reader = csv.reader((line for _, line in lines), delimiter=delimiter, strict=True)
    end = 0  # csv counts the lines it has consumed: a record starts on the line after the last one
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            unclosed = " a quote opened on this line is never closed;" if reader.line_num > end + 1 else ""
            raise DataError(
                f"{path}, line {end + 1}: malformed CSV ({e}):{unclosed} fix it, or pass {opt('quoting', 'none')}"
            ) from None
        yield end + 1, fields
        end = reader.line_num


def _table_rows(path, delimiter, quoted, encoding):
    """(line number, fields) per row of a CSV or TSV file; blank lines are skipped and every row must
    have as many fields as the first."""
    lines = _lines(path, encoding)
    if quoted:
        rows = _csv_rows(path, lines, delimiter)
    else:  # GLUE's TSV has unbalanced quotes: split on the delimiter only
        rows = ((number, line.rstrip("\r\n").split(delimiter)) for number, line in lines)
    width = None
    for number, fields in rows:
        if fields in ([], [""]):
            continue
        if width is None:
            width = len(fields)
        elif len(fields) != width:
            separated = {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))
            hint = f" (an unbalanced quote makes a field run on; fix it or pass {opt('quoting', 'none')})" if quoted else ""
            raise DataError(
                f"{path}, line {number}: {len(fields)} {separated}-separated fields where the first row "
                f"has {width}{hint}"
            )
        yield number, fields


def _json_rows(path, encoding):
    for number, line in _lines(path, encoding):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, found {type(row).__name__}")
        yield number, row


def _parquet_file(path):
    import pyarrow.parquet as pq  # only this format needs it

    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _parquet_rows(parquet, columns):
    """(row number, {column: value}), one record batch in memory at a time."""
    number = 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        for values in zip(*(batch.column(name).to_pylist() for name in columns)):
            number += 1
            yield number, dict(zip(columns, values))


def _memory_rows(table, name):
    """(names, rows) of a DataFrame or a dict of columns; rows are (key, {column: value}), keyed by
    the DataFrame's index label or the lists' 0-based position, as the user would look them up."""
    if isinstance(table, dict):
        columns, keys = {str(k): list(v) for k, v in table.items()}, None
    else:  # pandas: NaN, None, NA and NaT all become None
        keys = table.index.tolist()
        table = table.astype(object).where(table.notna(), None)
        columns = {str(k): table[k].tolist() for k in table.columns}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{name}: columns of different lengths ({', '.join(f'{k!r}: {n}' for k, n in lengths.items())})")
    keys = range(len(next(iter(columns.values()), []))) if keys is None else keys
    return list(columns), zip(keys, (dict(zip(columns, values)) for values in zip(*columns.values())))


# The columns of a tf.data.Dataset's elements. A tuple is positional: (text,), (text, label) or (text,
# pair, label); a dict names its columns, as tensorflow_datasets does ({"sentence1", "sentence2", "label",
# "idx"} for glue/mrpc); Keras's (dict of features, label) is the dict's columns plus "label".
_TUPLE_COLUMNS = {1: ("text",), 2: ("text", "label"), 3: ("text", "pair", "label")}
DATASET_ELEMENTS = ("(text, label), (text, pair, label), a dict of columns such as {'sentence': tf.string, "
                    "'label': tf.int64}, or (dict of columns, label); batched or not")


def _named(element):
    """{column: part} of one dataset element, or of the element_spec (the same structure)."""
    if isinstance(element, dict):
        return {str(k): v for k, v in element.items()}
    if isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], dict):
        return {**{str(k): v for k, v in element[0].items()}, "label": element[1]}
    element = element if isinstance(element, tuple) else (element,)
    return dict(zip(_TUPLE_COLUMNS.get(len(element), ()), element))


def dataset_options(data) -> dict:
    """The column options a positional (tuple) dataset fixes; {} for any other data."""
    if not is_dataset(data):
        return {}
    spec = data.element_spec
    if isinstance(spec, dict) or (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], dict)):
        return {}
    names = _TUPLE_COLUMNS.get(len(spec) if isinstance(spec, tuple) else 1, ())
    if names:
        return {"text_column": "text", "pair_column": "pair" if "pair" in names else None,
                "label_column": "label" if "label" in names else None}
    return {}


def _dataset_columns(dataset, name):
    """({column: TensorSpec}, batched) of a tf.data.Dataset; a clear error for what is not rows of columns."""
    import tensorflow as tf

    spec = dataset.element_spec
    if isinstance(spec, tuple) and len(spec) not in _TUPLE_COLUMNS and not (len(spec) == 2 and isinstance(spec[0], dict)):
        raise DataError(f"{name}: elements of {len(spec)} parts; expected {DATASET_ELEMENTS}; got element_spec {spec}")
    columns = _named(spec)
    for column, part in columns.items():
        if not isinstance(part, (tf.TensorSpec, tf.RaggedTensorSpec)):
            raise DataError(f"{name}: column {column!r} is a {type(part).__name__}, not a tensor; expected "
                            f"{DATASET_ELEMENTS}; got element_spec {spec}")
    first = columns[next(iter(columns))] if columns else None
    rank = first.shape.rank if first is not None else None
    if rank not in (0, 1):
        raise DataError(f"{name}: expected one value per example (rank 0), or batches of them (rank 1), in column "
                        f"{next(iter(columns))!r}; got element_spec {spec}")
    return columns, rank == 1


def _check_dataset_column(dataset, columns, batched, column, role, name):
    """Before anything is read: the text columns hold strings, the label column labels."""
    import tensorflow as tf

    part, rank = columns[column], 1 if batched else 0
    expected = (f"expected {DATASET_ELEMENTS}; got element_spec {dataset.element_spec}")
    if role == "text":
        if part.dtype != tf.string or part.shape.rank != rank:
            raise DataError(f"{name}: column {column!r} holds the texts, so it must be tf.string with one "
                            f"string per example, but it is {part}; {expected}")
        return
    if part.shape.rank == rank:  # one label per example
        ok = part.dtype in (tf.string, tf.bool) or part.dtype.is_integer or part.dtype.is_floating
    elif part.shape.rank == rank + 1:  # a list per example (multi-label): names, or ids of any number
        # A fixed-length integer vector could be ids or a 0/1 vector: refused rather than guessed.
        ok = part.dtype == tf.string or (part.dtype.is_integer and (isinstance(part, tf.RaggedTensorSpec)
                                                                    or part.shape[-1] is None))
    else:
        ok = False
    if not ok:
        raise DataError(f"{name}: column {column!r} holds the labels, so it must be one string, integer, float or "
                        f"bool per example, or for multi-label a list of label names or a ragged list of label "
                        f"ids (0/1 vectors: one column per label, with label_columns), but it is {part}; {expected}")


def _python(value):
    """A NumPy value from as_numpy_iterator as the Python value a file's reader would give."""
    if hasattr(value, "to_list"):  # a ragged value
        return value.to_list()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def _dataset_rows(dataset, batched, used):
    """(element number, {column: value}) per example, counted from 1, for the columns in `used`."""
    if batched:
        dataset = dataset.unbatch()
    for number, element in enumerate(dataset.as_numpy_iterator(), 1):
        row = _named(element)
        yield number, {k: _python(row[k]) for k in used}


def _tfrecord_rows(path):
    """(record number, {feature: value}) per tf.train.Example; a value is None, one item, or a list."""
    import tensorflow as tf  # only this format needs it
    from google.protobuf.message import DecodeError

    compression = "GZIP" if _is_gzip(path) else ""
    records = iter(tf.data.TFRecordDataset(str(path), compression_type=compression).as_numpy_iterator())
    number = 0
    while True:
        try:
            raw = next(records)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise DataError(f"{path}, record {number + 1}: cannot read the TFRecord file ({e.message})") from None
        number += 1
        try:
            example = tf.train.Example.FromString(raw)
        except DecodeError:
            raise DataError(f"{path}, record {number}: not a tf.train.Example") from None
        row = {}
        for key, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            values = list(getattr(feature, kind).value) if kind else []
            row[key] = None if not values else values[0] if len(values) == 1 else values
        yield number, row


def _folder_files(root):
    """(path, class name, bytes) for ROOT/<class>/<file>; hidden entries and loose files are skipped."""
    root = Path(root)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/<label>/<file>)")
    for folder in classes:
        for file in sorted(folder.iterdir()):
            if file.is_file() and not file.name.startswith("."):
                yield str(file), folder.name, file.read_bytes()


def _tar_files(archive, inner):
    """The same from a folder inside a tar archive, streamed member by member (no extraction)."""
    prefix = inner.split("/") if inner else []
    depth = len(prefix)
    found, folders = False, set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                folders.add("/".join(parts[:depth]))
                if (
                    member.isfile()
                    and len(parts) == depth + 2
                    and parts[:depth] == prefix
                    and not any(p.startswith(".") for p in parts[-2:])
                ):
                    found = True
                    yield f"{archive}/{'/'.join(parts)}", parts[-2], tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: cannot read the archive ({e})") from None
    if not found:
        close = difflib.get_close_matches(inner, sorted(folders), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise DataError(f"{archive}: no class subfolders under {inner or 'the top'} of the archive{hint}")


# ---------------------------------------------------------------------------------------------
# Columns


def _index(spec) -> int | None:
    """A 0-based column index given as an int or a string of digits; None for a column name."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec
    if isinstance(spec, str) and spec.isdigit():
        return int(spec)
    return None


def _column(spec, names, width, path, option) -> int:
    """The position of a column given by name or 0-based index."""
    index = _index(spec)
    if index is not None:
        if not 0 <= index < width:
            raise DataError(
                f"{path}: {opt(option, index)} is out of range: rows have {width} fields (0 to {width - 1})"
            )
        return index
    if names is None:
        raise DataError(
            f"{path}: {opt(option, spec)} is a name, but the file has no header ({opt('header', False)}): "
            "give columns by 0-based index"
        )
    if spec in names:
        at = [i for i, name in enumerate(names) if name == spec]
        if len(at) > 1:  # which one was meant cannot be told: refuse rather than take the first
            raise DataError(f"{path}: column {spec!r} appears {len(at)} times in the header (fields "
                            f"{', '.join(map(str, at))}, 0-based): rename one, or give the field by index "
                            f"({opt(option, at[0])})")
        return at[0]
    close = difflib.get_close_matches(str(spec), names, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise DataError(
        f"{path}: no column {spec!r} ({opt(option)}).{hint} Available columns: {', '.join(map(repr, names))}"
        + ("" if close else ". If the file has no header, give columns by 0-based index")
    )


def _looks_numeric(cell, delimiter) -> bool:
    parts = cell.split(delimiter) if delimiter else [cell]
    return all(re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", p) for p in parts)


def _has_header(first, sample, specs, label_index, delimiter) -> bool:
    """Guess whether a CSV/TSV file starts with a header row (used when header=None).

    Columns given by name: the file must have a header (missing names are reported against it).
    No columns given: a header when its first row holds 'text', 'sentence' or 'label'.
    Columns given only by index: a header when the first row's label cell is not a number but the
    label cells of the next rows all are (so string labels, like 'ham'/'spam', never detect a header:
    pass header=True then).
    """
    if any(_index(s) is None for s in specs):
        return True
    if not specs:
        return any(name in first for name in (*_DEFAULT_TEXT, _DEFAULT_LABEL))
    if label_index is None or label_index >= len(first) or not sample:
        return False
    return not _looks_numeric(first[label_index], delimiter) and all(
        _looks_numeric(row[label_index], delimiter) for _, row in sample
    )


@dataclass
class _Columns:
    """Where the text, pair and label values sit in a row: list positions or dict keys."""

    text: object
    text_name: str
    pair: object = None
    pair_name: str = ""
    label: object = None  # one column, or None
    label_name: str = ""
    flags: list | None = None  # [(key, label name)] for multi-label 0/1 columns
    keep: list | None = None  # [(key, name)] of columns carried through as they are (predict --keep-columns)


def _resolve(names, width, path, text_column, pair_column, label_column, label_columns, require_labels, keyed,
             keep_columns=None):
    """Find the columns in `names` (None: headerless); `keyed` rows are dicts, so return names, not positions."""

    def find(spec, option):
        i = _column(spec, names, width, path, option)
        return (names[i] if keyed else i), (names[i] if names else str(i))

    available = f" (available columns: {', '.join(map(repr, names))})" if names else ""
    if text_column is None:
        text_column = next((c for c in _DEFAULT_TEXT if names and c in names), None)
        if text_column is None:
            raise DataError(
                f"{path}: no 'text' or 'sentence' column; pass {opt('text_column')} (a name, or a 0-based index "
                f"for a file without header){available}"
            )
    text, text_name = find(text_column, "text_column")
    columns = _Columns(text, text_name)
    if pair_column is not None:
        columns.pair, columns.pair_name = find(pair_column, "pair_column")
    if label_column is not None and label_columns:
        raise DataError(f"{path}: give either {opt('label_column')} or {opt('label_columns')}, not both")
    if label_columns:
        columns.flags = [find(spec, "label_columns") for spec in label_columns]
    elif label_column is not None:
        columns.label, columns.label_name = find(label_column, "label_column")
    elif require_labels:  # without them (prediction), labels come only from a column given explicitly
        if not (names and _DEFAULT_LABEL in names):
            raise DataError(
                f"{path}: no 'label' column; pass {opt('label_column')} (or {opt('label_columns')} for 0/1 columns){available}"
            )
        columns.label, columns.label_name = find(_DEFAULT_LABEL, "label_column")
    if keep_columns is not None:
        columns.keep = [find(spec, "keep_columns") for spec in keep_columns]
    return columns


# ---------------------------------------------------------------------------------------------
# Cells


def _text(value, where, column, encoding) -> str:
    if isinstance(value, bytes):
        value = _decode(value, encoding, where, "value")
    if isinstance(value, list):
        raise DataError(f"{where}: column {column!r} holds {len(value)} values; a text must be one string")
    if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)):
        # A typed format (Parquet, JSON, TFRecord, a DataFrame) says this column holds numbers, not texts.
        raise DataError(f"{where}: column {column!r} holds a number ({value!r}), not a text: is it the text "
                        f"column? (pass {opt('text_column')})")
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if not text.strip():
        raise DataError(f"{where}: empty or missing text in column {column!r}")
    return text


def _kept(value):
    """A kept column's value as JSON can hold it: bytes (TFRecord) decoded, other types as they are."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_kept(v) for v in value]
    return value


def _label_text(value, encoding, where) -> str | None:
    """A label cell as a string; None when missing (empty, NaN, null)."""
    if isinstance(value, bytes):
        value = _decode(value, encoding, where, "value")
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)  # 1.0, as pandas writes an int column with gaps, is class "1"
    text = "" if value is None else str(value).strip()
    return None if text in ("", "nan", "NaN", "NAN") else text


def _label(value, where, columns, delimiter, id_names, encoding):
    """A str for a single label, a list[str] for multi-label (a list value or a delimited cell)."""
    items = value if isinstance(value, list) else [value]
    texts = [_label_text(v, encoding, where) for v in items]
    if None in texts:
        raise DataError(f"{where}: missing label (empty, NaN or null) in column {columns.label_name!r}")
    if delimiter:
        texts = [part.strip() for t in texts for part in t.split(delimiter) if part.strip()]
    if id_names is not None:
        path, names = id_names
        for i, t in enumerate(texts):
            if not (t.isdigit() and int(t) < len(names)):
                raise DataError(f"{where}: label {t!r} is not a label id of {path} (0 to {len(names) - 1})")
            texts[i] = names[int(t)]
    return texts if isinstance(value, list) or delimiter else texts[0]


def _flag(value, where, column, encoding) -> bool:
    """A 0/1 cell of a multi-label column."""
    if isinstance(value, bool):
        return value
    text = _label_text(value, encoding, where)
    if text is None:
        raise DataError(f"{where}: missing value (empty, NaN or null) in label column {column!r}")
    if text.lower() in ("1", "true"):
        return True
    if text.lower() in ("0", "false"):
        return False
    raise DataError(f"{where}: label column {column!r} must hold 0 or 1, found {text!r}")


def _read_label_names(path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the label names ({opt('label_names')}): {e}") from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise DataError(f"{path}, line {names.index('') + 1}: empty label name (one name per line)")
    return names


# ---------------------------------------------------------------------------------------------
# Public readers


def iter_examples(
    path, *, text_column=None, pair_column=None, label_column=None, label_columns=None, format=None,
    header=None, quoting=None, encoding="utf-8", label_delimiter=None, label_names=None, limit=None,
    require_labels=True, keep_columns=None,
):
    """Stream (where, text, pair, label) from a data file of any size with bounded memory; with
    keep_columns (names or 0-based indexes, or "a,b"), (where, text, pair, label, {name: value}) with
    those columns' values as they are (text from csv/tsv; JSON, Parquet and TFRecord values typed).

    where is the 1-based physical line where the row starts for csv, tsv and jsonl, the 1-based row
    or record number for parquet and tfrecord, and the file's path for folders. pair is None without
    pair_column; label is None when there is no label column (allowed when require_labels=False).

    Columns: by name, or by 0-based index (an int or a string of digits) for headerless files. Without
    text_column the 'text' or else the 'sentence' column is used; without label_column the 'label'
    column (unless require_labels=False: then labels are read only from a column given explicitly).
    label_columns: several 0/1 columns, one per label (multi-label; label names are the column names).
    label_delimiter: one column of delimited labels (multi-label).
    label_names: a file with one name per line that maps integer label ids 0, 1, ... to names.
    header: True, False (--no-header), or None to detect (see _has_header). quoting: "csv" (default
    for csv) or "none" (default for tsv: split on tabs only, as GLUE's unbalanced quotes require).
    Blank lines are skipped; limit stops after that many examples.
    """
    if isinstance(label_columns, str):  # "a,b,c", as a command line gives it
        label_columns = label_columns.split(",")
    if isinstance(keep_columns, (str, int)):
        keep_columns = str(keep_columns).split(",")
    table = None
    if isinstance(path, (str, os.PathLike)) and (Path(path).is_char_device() or Path(path).is_block_device()):
        # /dev/zero never ends and has no line breaks: reading it would fill the memory.
        raise DataError(f"{path}: is a device, not a data file")
    if isinstance(path, (str, os.PathLike)) and Path(path).is_fifo():
        # A second open of a pipe waits for a writer that never comes: fail before the first.
        raise DataError(f"{path}: is a pipe (such as <(zcat data.csv.gz)), which can be read once, and data is "
                        "read more than once (its header, then its rows): write it to a file first")
    if is_table(path):
        if format not in (None, "table"):
            raise DataError(f"format={format!r} applies to files; this data is a {_table_name(path)} in memory")
        # A tuple's parts are positional: they fix the columns, whatever a run saved for its files.
        positional = dataset_options(path)
        if positional:
            text_column, pair_column, label_column = (positional[k] for k in ("text_column", "pair_column", "label_column"))
            label_columns = None
        table, path, format = path, _table_name(path), "table"
    elif not isinstance(path, (str, os.PathLike)):
        raise DataError(f"data must be a file or folder path, a pandas DataFrame or a dict of columns, "
                        f"not a {type(path).__name__}")
    elif format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise DataError(f"unknown format {format!r}: {opt('format')} must be one of {', '.join(FORMATS)}")
    elif not (Path(path).exists() or _archive_parts(path)):
        raise DataError(f"{path}: no such file or folder")
    if quoting not in (None, "csv", "none"):
        raise DataError(f"unknown quoting {quoting!r}: {opt('quoting')} must be csv or none")
    for name in encoding.split(","):
        try:
            codecs.lookup(name.strip())
        except LookupError:
            raise DataError(f"unknown encoding {name.strip()!r} ({opt('encoding')})") from None

    if format == "folder":
        given = dict(text_column=text_column, pair_column=pair_column, label_column=label_column,
                     label_columns=label_columns, label_delimiter=label_delimiter, label_names=label_names,
                     keep_columns=keep_columns)
        if any(v is not None for v in given.values()):
            raise DataError(
                f"{path}: column and label options do not apply to a folder "
                "(the text is each file's content, the label its folder's name)"
            )
        examples = _folder_examples(path, encoding)
    elif table is None and Path(path).is_dir():
        raise DataError(f"{path}: is a folder, but {opt('format', format)} reads a file")
    else:
        id_names = (label_names, _read_label_names(label_names)) if label_names is not None else None
        if id_names and label_columns:
            raise DataError(f"{opt('label_names')} maps label ids in {opt('label_column')}; {opt('label_columns')} "
                            "are named by their header")
        examples = _row_examples(
            path, format, text_column, pair_column, label_column, label_columns, header, quoting, encoding,
            label_delimiter, id_names, require_labels, table, keep_columns,
        )
    count = 0
    for example in islice(examples, limit):
        count += 1
        yield example
    if count == 0 and limit != 0:
        raise DataError(f"{path}: no examples in it")


def _folder_examples(path, encoding):
    parts = _archive_parts(path)
    if parts:
        files = _tar_files(*parts)
    elif Path(path).is_dir():
        files = _folder_files(path)
    elif tarfile.is_tarfile(path):  # --format folder on an archive with an unusual name
        files = _tar_files(path, "")
    else:
        raise DataError(f"{path}: {opt('format', 'folder')} needs a folder or a tar archive")
    for name, label, data in files:
        text = _decode(data, encoding, name, "file").removeprefix("\ufeff")
        if not text.strip():
            raise DataError(f"{name}: empty file")
        yield name, text, None, label


def _row_examples(path, format, text_column, pair_column, label_column, label_columns, header, quoting,
                  encoding, label_delimiter, id_names, require_labels, table=None, keep_columns=None):
    keyed = format != "csv" and format != "tsv"
    specs = [s for s in (text_column, pair_column, label_column, *(label_columns or ())) if s is not None]
    specs += [s for s in keep_columns or () if _index(s) is None]  # a kept column's name needs a header too
    if format == "table" and is_dataset(table):  # path is the table's name, for messages
        if keep_columns is not None:
            raise DataError(f"{path}: keep_columns applies to files and tables, not to a tf.data.Dataset")
        spec, batched = _dataset_columns(table, path)
        names = list(spec)
        columns = _resolve(names, len(names), path, text_column, pair_column, label_column, label_columns,
                           require_labels, keyed)
        used = [columns.text, columns.pair, columns.label, *(k for k, _ in columns.flags or ())]
        used = list(dict.fromkeys(k for k in used if k is not None))
        for key in used:
            role = "text" if key in (columns.text, columns.pair) else "label"
            _check_dataset_column(table, spec, batched, key, role, path)
        rows = _dataset_rows(table, batched, used)
    elif format == "table":
        names, rows = _memory_rows(table, path)
        columns = _resolve(names, len(names), path, text_column, pair_column, label_column, label_columns,
                           require_labels, keyed, keep_columns)
    elif format == "parquet":
        parquet = _parquet_file(path)
        names = parquet.schema_arrow.names
        columns = _resolve(names, len(names), path, text_column, pair_column, label_column, label_columns,
                           require_labels, keyed, keep_columns)
        used = [columns.text, columns.pair, columns.label, *(k for k, _ in (columns.flags or []) + (columns.keep or []))]
        rows = _parquet_rows(parquet, list(dict.fromkeys(k for k in used if k is not None)))
    else:
        if format == "jsonl":
            rows = _json_rows(path, encoding)
        elif format == "tfrecord":
            rows = _tfrecord_rows(path)
        else:
            quoted = (quoting or ("csv" if format == "csv" else "none")) == "csv"
            rows = _table_rows(path, "," if format == "csv" else "\t", quoted, encoding)
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path}: the file is empty")
        if keyed:
            names = list(first[1]) if format == "jsonl" else sorted(first[1])
            rows = chain([first], rows)
        else:
            sample = []
            if header is None:
                sample = list(islice(rows, _HEADER_SAMPLE))
                label_spec = label_column if label_column is not None else (label_columns or [None])[0]
                label_index = _index(label_spec) if label_spec is not None else None
                header = _has_header(first[1], sample, specs, label_index, label_delimiter)
            names = first[1] if header else None
            rows = chain(sample, rows) if header else chain([first], sample, rows)
        columns = _resolve(names, len(names or first[1]), path, text_column, pair_column, label_column,
                           label_columns, require_labels, keyed, keep_columns)

    where = unit_of(path if table is None else table, format)  # the numbering messages and Examples share
    get = (lambda row, key: row.get(key)) if keyed else (lambda row, key: row[key])
    for number, row in rows:
        at = f"{path}, {where} {number}"
        text = _text(get(row, columns.text), at, columns.text_name, encoding)
        pair = None if columns.pair is None else _text(get(row, columns.pair), at, columns.pair_name, encoding)
        if columns.flags:
            label = [name for key, name in columns.flags if _flag(get(row, key), at, name, encoding)]
        elif columns.label is not None:
            label = _label(get(row, columns.label), at, columns, label_delimiter, id_names, encoding)
        else:
            label = None
        if columns.keep is None:
            yield number, text, pair, label
        else:
            yield number, text, pair, label, {name: _kept(get(row, key)) for key, name in columns.keep}


def peek_columns(path, *, format=None, header=None, quoting=None, encoding="utf-8", rows=200) -> dict | None:
    """The columns of a data file or table and their first `rows` values, for `bertfit inspect` to show
    and guess from: {"names": [...], "header": bool, "values": {name: [value, ...]}, "types": {name: str}}.
    A headerless CSV/TSV's columns are named by their 0-based index ("0", "1", ...). None for a folder,
    whose layout fixes text and label."""
    if is_dataset(path):
        spec, batched = _dataset_columns(path, _table_name(path))
        sample = [row for _, row in islice(_dataset_rows(path, batched, list(spec)), rows)]
        names, header = list(spec), True
    elif is_table(path):
        names, table_rows = _memory_rows(path, _table_name(path))
        sample, header = [row for _, row in islice(table_rows, rows)], True
    else:
        format = format or detect_format(path)
        if format == "folder":
            return None
        if format == "parquet":
            parquet = _parquet_file(path)
            names = parquet.schema_arrow.names
            sample = [row for _, row in islice(_parquet_rows(parquet, names), rows)]
            types = {name: str(parquet.schema_arrow.field(name).type) for name in names}
            return {"names": names, "header": True, "values": {n: [r[n] for r in sample] for n in names},
                    "types": types}
        if format in ("jsonl", "tfrecord"):
            reader = _json_rows(path, encoding) if format == "jsonl" else _tfrecord_rows(path)
            sample = [row for _, row in islice(reader, rows)]
            names, header = list(dict.fromkeys(key for row in sample for key in row)), True
        else:
            quoted = (quoting or ("csv" if format == "csv" else "none")) == "csv"
            fields = [row for _, row in islice(_table_rows(path, "," if format == "csv" else "\t", quoted, encoding),
                                               rows + 1)]
            if not fields:
                raise DataError(f"{path}: the file is empty")
            header = _looks_like_header(fields) if header is None else header
            names = fields[0] if header else [str(i) for i in range(len(fields[0]))]
            sample = [dict(zip(names, row)) for row in (fields[1:] if header else fields[:rows])]
    if not sample:
        raise DataError(f"{_table_name(path) if is_table(path) else path}: no rows in it")
    values = {name: [row.get(name) for row in sample] for name in names}
    types = {name: "/".join(sorted({type(v).__name__ for v in vs if v is not None})) or "null"
             for name, vs in values.items()}
    return {"names": names, "header": header, "values": values, "types": types}


def _looks_like_header(fields) -> bool:
    """Whether a CSV/TSV file's first row names its columns: every cell a short name, distinct, not a
    number, where some later row holds a cell that is no name (a sentence, a number, an empty cell)."""
    def name_like(cell):
        return bool(re.fullmatch(r"[^\d\s][^\t]{0,39}", cell.strip())) and cell.count(" ") <= 3

    first = fields[0]
    if _has_header(first, [], [], None, None):  # 'text', 'sentence' or 'label' among them
        return True
    return (all(name_like(c) for c in first) and len(set(first)) == len(first)
            and any(not name_like(c) for row in fields[1:] for c in row))


def read_examples(
    path, *, text_column=None, pair_column=None, label_column=None, label_columns=None, format=None,
    header=None, quoting=None, encoding="utf-8", label_delimiter=None, label_names=None, limit=None,
    require_labels=True,
) -> Examples:
    """Read a whole data file into Examples; options as for iter_examples.

    When any label is a list (multi-label), every label becomes a list.
    """
    wheres, texts, pairs, labels = [], [], [], []
    for where, text, pair, label in iter_examples(
        path, text_column=text_column, pair_column=pair_column, label_column=label_column,
        label_columns=label_columns, format=format, header=header, quoting=quoting, encoding=encoding,
        label_delimiter=label_delimiter, label_names=label_names, limit=limit, require_labels=require_labels,
    ):
        wheres.append(where)
        texts.append(text)
        pairs.append(pair)
        labels.append(label)
    labels = uniform_labels(labels)
    return Examples(
        texts,
        pairs if pairs and pairs[0] is not None else None,
        labels if labels and labels[0] is not None else None,
        _table_name(path) if is_table(path) else str(path),
        wheres,
        unit_of(path, format),
    )


def uniform_labels(labels: list) -> list:
    """When any label is a list (multi-label), every label becomes a list."""
    if any(isinstance(label, list) for label in labels):
        return [label if isinstance(label, list) else [label] for label in labels]
    return labels


def read_subset(path, indices, labels, **read_options) -> Examples:
    """Examples number `indices` (0-based, ascending) of a data file, in a second pass over it; their
    labels are taken from `labels` (all of the file's, as read the first time)."""
    wanted = set(indices)
    wheres, texts, pairs = [], [], []
    for i, (where, text, pair, _) in enumerate(iter_examples(path, **read_options)):
        if i in wanted:
            wheres.append(where)
            texts.append(text)
            pairs.append(pair)
    return Examples(texts, pairs if pairs and pairs[0] is not None else None, [labels[i] for i in indices], str(path),
                    wheres, unit_of(path, read_options.get("format")))


# ---------------------------------------------------------------------------------------------
# Labels


def _label_order(names):
    """Integer labels ("0", "1", ..., "10") sort numerically; any other set sorts as strings."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _as_list(label):
    return list(label) if isinstance(label, (list, tuple)) else [label]


@dataclass
class LabelVocab:
    """Label names and their ids (the position in `names`), single- or multi-label."""

    names: list[str]
    multilabel: bool = False

    @classmethod
    def from_labels(cls, labels, multilabel=False, source="") -> "LabelVocab":
        """The sorted set of labels; lists of labels make it multi-label."""
        labels = list(labels)
        multilabel = multilabel or any(isinstance(label, (list, tuple)) for label in labels)
        names = _label_order({str(name) for label in labels for name in _as_list(label)})
        if len(names) < 2:
            found = f"only the class {names[0]!r}" if names else "no labels"
            raise DataError(f"{source or 'the data'}: {found}; a classifier needs at least 2 classes")
        return cls(names, multilabel)

    def encode(self, labels, source="") -> np.ndarray:
        """int32 ids [N], or float32 multi-hot [N, C] for a multi-label vocabulary. source: a name for
        messages, or the Examples the labels come from (messages then say the line, row or file)."""
        ids = {name: i for i, name in enumerate(self.names)}
        at = source.place if isinstance(source, Examples) else lambda row: place(source, None, None, row)

        def id_of(name, row):
            i = ids.get(str(name))
            if i is None:
                known = ", ".join(map(repr, self.names[:20])) + (", ..." if len(self.names) > 20 else "")
                raise DataError(
                    f"{at(row)}: the label {str(name)!r} is not one of the {len(self.names)} known labels: {known}"
                )
            return i

        if self.multilabel:
            out = np.zeros((len(labels), len(self.names)), np.float32)
            for row, label in enumerate(labels):
                for name in _as_list(label):
                    out[row, id_of(name, row)] = 1.0
            return out
        out = np.empty(len(labels), np.int32)
        for row, label in enumerate(labels):
            if isinstance(label, (list, tuple)):
                raise DataError(f"{at(row)}: a list of labels, but the labels are single-label")
            out[row] = id_of(label, row)
        return out

    def to_json(self) -> dict:
        return {"names": list(self.names), "multilabel": self.multilabel}

    @classmethod
    def from_json(cls, d) -> "LabelVocab":
        return cls([str(n) for n in d["names"]], bool(d.get("multilabel", False)))


def stratified_split(examples: Examples, fraction=0.2, seed=0) -> tuple[Examples, Examples]:
    """Split into (kept, held out), holding out `fraction` of each class.

    Each class gives floor(size * fraction) examples, and the remaining places (to reach
    round(N * fraction) in all) go to the classes with the largest remainders. Multi-label examples
    are stratified by their first label (label sets are too many, and mostly too rare, to stratify
    by; an example without labels counts as its own class). Deterministic for a given seed; both
    parts keep file order.
    """
    kept, held = stratified_indices(examples.labels, len(examples), fraction, seed, examples.source)
    return examples.subset(kept), examples.subset(held)


def stratified_indices(labels, n, fraction=0.2, seed=0, source="data") -> tuple[list[int], list[int]]:
    """The indices that stratified_split keeps and holds out, in order, for n examples with these labels."""
    if not 0 < fraction < 1:
        raise DataError(f"the held-out fraction must be between 0 and 1, not {fraction}")
    classes: dict[str, list[int]] = {}
    for i in range(n):
        label = "" if labels is None else labels[i]
        if isinstance(label, (list, tuple)):
            label = label[0] if label else ""
        classes.setdefault(str(label), []).append(i)
    keys = sorted(classes)
    shares = [len(classes[k]) * fraction for k in keys]
    quotas = [math.floor(s) for s in shares]
    missing = round(n * fraction) - sum(quotas)
    for j in sorted(range(len(keys)), key=lambda j: quotas[j] - shares[j])[:missing]:
        quotas[j] += 1
    rng = np.random.default_rng(seed)
    held = set()
    for key, quota in zip(keys, quotas):
        held.update(rng.permutation(classes[key])[:quota].tolist())
    if not held or len(held) == n:
        raise DataError(f"{source}: {n} examples are too few to hold out a fraction of {fraction}")
    return [i for i in range(n) if i not in held], sorted(held)
