"""`bertfit inspect` on real data in every format: the columns it lists and guesses, the labels it
counts and the warnings it gives (issue 27 item 4), and the bad labels and texts it reports (issue 26)."""

import csv
import json
from pathlib import Path

import pytest

from bertfit.data import read_examples
from bertfit.errors import DataError
from bertfit.inspection import format_report, inspect_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMS = SHARED / "sms_spam" / "SMSSpamCollection"  # label<TAB>text, no header; 4,827 ham / 747 spam


@pytest.fixture(scope="module")
def sms_rows():
    with open(SMS, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f][:300]


def write_formats(folder, rows):
    """The SMS rows as `message,category` in CSV, JSONL, Parquet and TFRecord (names that are not
    bertfit's defaults, as a newcomer's file has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    with open(folder / "sms.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("message", "category"), *((text, label) for label, text in rows)])
    (folder / "sms.jsonl").write_text("".join(json.dumps({"id": i, "message": t, "category": c}) + "\n"
                                              for i, (c, t) in enumerate(rows)))
    pq.write_table(pa.table({"category": [c for c, _ in rows], "message": [t for _, t in rows]}), folder / "sms.parquet")
    with tf.io.TFRecordWriter(str(folder / "sms.tfrecord")) as w:
        for c, t in rows:
            feature = {"message": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()])),
                       "category": tf.train.Feature(bytes_list=tf.train.BytesList(value=[c.encode()]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return [folder / f"sms.{ext}" for ext in ("csv", "jsonl", "parquet", "tfrecord")]


def test_inspect_lists_columns_and_guesses_text_and_label_in_every_format(tiny_model, sms_rows, tmp_path):
    import pandas as pd

    expected = {"ham": sum(c == "ham" for c, _ in sms_rows), "spam": sum(c == "spam" for c, _ in sms_rows)}
    assert expected["spam"] > 0 and expected["ham"] >= 4 * expected["spam"]
    frame = pd.DataFrame({"message": [t for _, t in sms_rows], "category": [c for c, _ in sms_rows]})
    for source in (*write_formats(tmp_path, sms_rows), frame):
        report = inspect_data(source, model=tiny_model)
        assert report["guessed"] == {"text_column": "message", "label_column": "category"}, source
        assert {"message", "category"} <= {c["name"] for c in report["columns"]}
        assert report["labels"] == expected and report["rows"] == len(sms_rows)
        assert any("imbalanced" in w and "f1_macro" in w and "class_weight" in w for w in report["warnings"])
        # The guessed options read the file as inspect did.
        assert read_examples(source, **report["guessed_options"]).labels == [c for c, _ in sms_rows]
    text = format_report(inspect_data(tmp_path / "sms.csv", model=tiny_model))
    assert "guessed text 'message', label 'category'" in text and "warning: imbalanced labels" in text


def test_inspect_guesses_the_columns_of_headerless_real_files(tiny_model):
    from bertfit import config

    report = inspect_data(SMS, format="tsv", model=tiny_model)
    assert report["guessed_options"] == {"text_column": "1", "label_column": "0", "header": False}
    assert report["labels"] == {"ham": 4827, "spam": 747}
    # CoLA: source, label, original mark (mostly empty), sentence; the source groups rows, the label does not.
    report = inspect_data(SHARED / "cola" / "dev.tsv", model=tiny_model)
    assert report["guessed"] == {"text_column": "3", "label_column": "1"} and report["labels"] == {"1": 721, "0": 322}
    # MRPC's header names neither text nor label: a pair of sentence columns and 'Quality'.
    report = inspect_data(SHARED / "mrpc" / "dev.tsv", model=tiny_model)
    assert report["guessed"] == {"text_column": "#1 String", "pair_column": "#2 String", "label_column": "Quality"}
    assert report["pairs"] and report["labels"] == {"1": 279, "0": 129}
    config.COMMAND_LINE = True
    try:
        assert "pass --text-column '#1 String' --pair-column '#2 String' --label-column Quality" in format_report(report)
    finally:
        config.COMMAND_LINE = False
    # GoEmotions: comma-separated label ids.
    report = inspect_data(SHARED / "goemotions" / "dev.tsv", model=tiny_model)
    assert report["guessed"] == {"text_column": "0", "label_column": "1", "label_delimiter": ","}
    assert len(report["labels"]) == 28 and report["multilabel_rows"] > 0
    # SST-2's test file has no labels: its 'index' column is no label, and the texts are inspected alone.
    report = inspect_data(SHARED / "sst2" / "test.tsv", model=tiny_model)
    assert report["rows"] == 1821 and report["labels"] == {} and report["guessed"] == {}


def test_inspect_warns_on_one_class_and_rare_labels(tiny_model, tmp_path):
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"message {i},ham\n" for i in range(20)))
    warnings = inspect_data(one, model=tiny_model)["warnings"]
    assert len(warnings) == 1 and "only one label ('ham')" in warnings[0]
    rare = tmp_path / "rare.csv"
    rare.write_text("text,label\n" + "".join(f"message {i},{'a' if i % 2 else 'b'}\n" for i in range(20))
                    + "odd one,c\n")
    warnings = inspect_data(rare, model=tiny_model)["warnings"]
    assert any("fewer than 5 examples of 'c'" in w for w in warnings)
    assert any("imbalanced" in w for w in warnings)  # 10 to 1
    balanced = tmp_path / "balanced.csv"
    balanced.write_text("text,label\n" + "".join(f"message {i},{'a' if i % 2 else 'b'}\n" for i in range(20)))
    assert inspect_data(balanced, model=tiny_model)["warnings"] == []


def test_inspect_reports_missing_labels_and_numbers_as_texts(tiny_model, tmp_path):
    """Issue 26 item 4: a missing label was passed over (the file was inspected as unlabelled), and a
    column of numbers was accepted as texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "gap.parquet"
    pq.write_table(pa.table({"text": ["a fine film", "a dull film", "more"], "label": ["pos", None, "neg"]}), path)
    with pytest.raises(DataError, match=r"gap.parquet, row 2: missing label"):
        inspect_data(path, model=tiny_model)
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "label": ["pos", "neg", "pos"]}), path)
    with pytest.raises(DataError, match=r"ints.parquet, row 1: column 'text' holds a number \(1\), not a text"):
        inspect_data(path, model=tiny_model)
    path = tmp_path / "ints.jsonl"
    path.write_text('{"text": 7, "label": "pos"}\n')
    with pytest.raises(DataError, match=r"ints.jsonl, line 1: column 'text' holds a number"):
        read_examples(path)
