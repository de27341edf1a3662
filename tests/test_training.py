"""Fine-tuning end to end on tiny random BERTs: each task type, the run folder, determinism, resume."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import bertfit
from bertfit.errors import BertfitError
from conftest import NEGATIVE, POSITIVE, sentiment_rows, write_tsv

FAST = dict(epochs=3, learning_rate=1e-2, batch_size=16, export=False, max_length=32)


@pytest.fixture(scope="module")
def binary_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("binary")
    return (write_tsv(d / "train.tsv", ["text", "label"], sentiment_rows(320, seed=1)),
            write_tsv(d / "dev.tsv", ["text", "label"], sentiment_rows(80, seed=2)))


def test_binary_run_folder_and_reload(tiny_model, binary_files, tmp_path):
    train, dev = binary_files
    out = tmp_path / "run"
    clf = bertfit.fine_tune(train, dev, text="text", label="label", model=tiny_model, out=out, **FAST)
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] >= 0.9, m["accuracy"]
    for key in ("precision_macro", "recall_macro", "f1_macro", "f1_micro", "f1_weighted", "mcc", "roc_auc",
                "pr_auc", "confusion_matrix", "per_class"):
        assert key in m
    assert len(m["history"]) == 3 and m["split"] == "validation"
    assert [len(h["step_loss"]) for h in m["history"]] == [20, 20, 20]  # 320 rows in batches of 16
    assert np.mean(m["history"][0]["step_loss"]) == pytest.approx(m["history"][0]["loss"], abs=1e-4)
    for name in ("config.yaml", "weights.safetensors", "vocab.txt", "report.html", "run.json", "source.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()  # a complete run needs them no more (--keep-checkpoints keeps them)
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
    # TensorBoard: Keras's layout, the training and validation loss under one tag (overlaid), the
    # validation metrics, and the smoothed per-step loss.
    scalars = tensorboard_scalars(out / "logs")
    assert [v for _, v in scalars["train"]["epoch_loss"]] == pytest.approx([h["loss"] for h in m["history"]], abs=1e-6)
    assert [v for _, v in scalars["validation"]["epoch_loss"]] == pytest.approx(
        [h["val_loss"] for h in m["history"]], abs=1e-6)
    assert [s for s, _ in scalars["validation"]["epoch_accuracy"]] == [0, 1, 2]
    assert {"epoch_f1_macro", "epoch_roc_auc"} <= set(scalars["validation"])
    assert len(scalars["train"]["batch_loss"]) == 6 and "epoch_learning_rate" in scalars["train"]  # 60 steps

    texts = ["a great film", "an awful plot", "this was superb and very good"]
    loaded = bertfit.load(out)
    np.testing.assert_allclose(loaded.predict_proba(texts), clf.predict_proba(texts), atol=1e-6)
    assert [p["label"] for p in loaded.predict(texts)] == ["pos", "neg", "pos"]
    assert loaded.evaluate(dev)["accuracy"] == pytest.approx(m["accuracy"])


def tensorboard_scalars(logdir):
    """{run: {tag: [(step, value)]}} from the event files under logdir (each subfolder is a run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for run in sorted(p for p in logdir.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        runs[run.name] = {tag: [(e.step, float(tf_value(e))) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return runs


def tf_value(event):
    import tensorflow as tf

    return tf.make_ndarray(event.tensor_proto)


def test_same_seed_same_metrics(tiny_model, binary_files):
    train, dev = binary_files
    runs = [bertfit.fine_tune(train, dev, model=tiny_model, log=lambda m: None, **dict(FAST, epochs=1)).metrics
            for _ in range(2)]
    assert runs[0]["log_loss"] == runs[1]["log_loss"]
    other = bertfit.fine_tune(train, dev, model=tiny_model, seed=7, log=lambda m: None, **dict(FAST, epochs=1)).metrics
    assert other["log_loss"] != runs[0]["log_loss"]


def test_data_in_memory_trains_and_evaluates_as_its_file_does(tiny_model, binary_files):
    import pandas as pd

    train, dev = binary_files
    train_frame = pd.DataFrame(sentiment_rows(320, seed=1), columns=["text", "label"])  # the rows of the files
    dev_columns = dict(zip(["text", "label"], map(list, zip(*sentiment_rows(80, seed=2)))))
    options = dict(model=tiny_model, log=lambda m: None, **dict(FAST, epochs=1))
    from_files = bertfit.fine_tune(train, dev, **options)
    from_memory = bertfit.fine_tune(train_frame, dev_columns, **options)
    assert from_memory.metrics["log_loss"] == from_files.metrics["log_loss"]
    by_file, by_frame = from_files.evaluate(dev), from_files.evaluate(pd.DataFrame(dev_columns))
    assert (by_frame["log_loss"], by_frame["confusion_matrix"]) == (by_file["log_loss"], by_file["confusion_matrix"])
    # No validation data: the held-out split of a streamed file (its rows picked from the token cache,
    # its texts re-read for the report) is the split of the same rows in memory.
    split_file, split_memory = (bertfit.fine_tune(data, **options).metrics for data in (train, train_frame))
    assert split_file["log_loss"] == split_memory["log_loss"] and split_file["train_examples"] == 288


def test_fine_tune_runs_fit_with_the_users_keras_callbacks(tiny_model, binary_files):
    """fine_tune trains with keras.Model.fit: a Keras callback of the user's sees every step and the
    epoch's logs (the training loss and the validation metrics), and Keras's EarlyStopping ends it."""
    import keras

    train, dev = binary_files
    steps, epochs = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(batch)

        def on_epoch_end(self, epoch, logs=None):
            epochs.append(dict(logs))

    # An improvement no model makes (min_delta 2): Keras stops after the second epoch (never after the first).
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=0, min_delta=2.0)
    clf = bertfit.fine_tune(train, dev, model=tiny_model, log=lambda m: None, callbacks=[Record(), stop], **FAST)
    history = clf.metrics["history"]
    assert len(history) == len(epochs) == 2 and FAST["epochs"] == 3
    assert len(steps) == 2 * 20  # 320 rows in batches of 16
    for logs, record in zip(epochs, history):
        assert logs["val_accuracy"] == record["val_accuracy"] and logs["val_loss"] == record["val_loss"]
        assert logs["loss"] == pytest.approx(record["loss"])


def test_tf_data_trains_evaluates_and_predicts_as_its_file_does(tiny_model, binary_files):
    import tensorflow as tf

    from bertfit.errors import DataError

    train, dev = binary_files
    rows, dev_rows = sentiment_rows(320, seed=1), sentiment_rows(80, seed=2)  # the rows of the files
    options = dict(model=tiny_model, log=lambda m: None, **dict(FAST, epochs=1))
    from_file = bertfit.fine_tune(train, dev, **options)
    train_ds = tf.data.Dataset.from_tensor_slices(tuple(map(list, zip(*rows)))).batch(32)  # (text, label)
    dev_ds = tf.data.Dataset.from_tensor_slices(dict(zip(["text", "label"], map(list, zip(*dev_rows)))))
    from_dataset = bertfit.fine_tune(train_ds, dev_ds, **options)
    assert from_dataset.metrics["log_loss"] == from_file.metrics["log_loss"]
    by_file, by_dataset = from_file.evaluate(dev), from_file.evaluate(dev_ds)
    assert (by_dataset["log_loss"], by_dataset["confusion_matrix"]) == (by_file["log_loss"], by_file["confusion_matrix"])
    texts = [t for t, _ in dev_rows[:5]]
    np.testing.assert_array_equal(from_file.predict_proba(tf.data.Dataset.from_tensor_slices(texts)),
                                  from_file.predict_proba(texts))
    # A wrong element structure fails before any training, naming what was expected and what was given.
    with pytest.raises(DataError, match=r"column 'text' holds the texts.*int32.*expected \(text, label\)"):
        bertfit.fine_tune(tf.data.Dataset.from_tensor_slices(([1, 2], [0, 1])), **options)


def test_tf_data_pairs(tiny_model):
    """(text, pair, label) tuples make a pair classifier; tensorflow_datasets' glue/mrpc dicts name
    their columns; a dataset without the second texts is refused by a pair run."""
    import tensorflow as tf

    from bertfit.errors import ConfigError

    rows = sentiment_rows(64, seed=5)
    texts, labels = [t for t, _ in rows], [int(y == "pos") for _, y in rows]
    seconds = [f"and the second sentence {i}" for i in range(64)]
    options = dict(model=tiny_model, log=lambda m: None, **dict(FAST, epochs=1))
    clf = bertfit.fine_tune(tf.data.Dataset.from_tensor_slices((texts, seconds, labels)), **options)
    assert clf.data_config.pair_column == "pair" and clf.labels == ["0", "1"]
    mrpc = tf.data.Dataset.from_tensor_slices({"sentence1": texts, "sentence2": seconds, "label": labels,
                                               "idx": list(range(64))})
    by_dict = bertfit.fine_tune(mrpc, text="sentence1", pair="sentence2", **options)
    assert by_dict.metrics["log_loss"] == clf.metrics["log_loss"]
    np.testing.assert_array_equal(clf.predict_proba(tf.data.Dataset.from_tensor_slices((texts[:4], seconds[:4], labels[:4]))),
                                  clf.predict_proba(texts[:4], seconds[:4]))
    with pytest.raises(ConfigError, match="classifies pairs.*'pair'"):
        clf.predict_proba(tf.data.Dataset.from_tensor_slices(texts[:4]))


def test_a_training_file_streams_through_a_token_cache(tiny_model, tmp_path):
    """Training data is tokenized chunk by chunk into memory-mapped files: Python memory stays
    bounded by a chunk, not the file, and the cache leaves the run folder when training ends."""
    import tracemalloc

    from bertfit import features
    from bertfit.data import read_examples

    path = write_tsv(tmp_path / "big.tsv", ["text", "label"], sentiment_rows(40_000, seed=5))
    tokenizer = bertfit.load_pretrained(tiny_model).tokenizer
    tracemalloc.start()
    labels, streamed = features.encode_file(tokenizer, path, {}, tmp_path / "cache", max_length=32)
    streamed_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    examples = read_examples(path)
    in_memory = features.encode(tokenizer, examples.texts, max_length=32)
    memory_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert streamed_peak < 0.3 * memory_peak, (streamed_peak, memory_peak)
    assert isinstance(streamed.ids, np.memmap) and labels == examples.labels
    assert np.array_equal(streamed.ids, in_memory.ids) and np.array_equal(streamed.offsets, in_memory.offsets)

    out = tmp_path / "run"
    bertfit.fine_tune(path, model=tiny_model, out=out, log=lambda m: None,
                      **dict(FAST, epochs=1, batch_size=256))
    assert not list(out.glob(".token-cache-*")) and (out / "run.json").exists()


def test_multiclass_with_recipe_options(tiny_model, tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], sentiment_rows(360, seed=3, classes=3))
    # Mean pooling: through [CLS] the tiny random BERT learned only 2 of the 3 classes (accuracy 0.667)
    # for 3 of seeds 0-3; with mean pooling every seed reached 1.0 by epoch 3 (hand-run, 2026-11-23).
    clf = bertfit.fine_tune(train, model=tiny_model, class_weight="balanced", layerwise_lr_decay=0.9,
                            validation_split=0.2, pooling="mean", log=lambda m: None,
                            **dict(FAST, epochs=6, batch_size=8))
    assert clf.labels == ["meh", "neg", "pos"]
    assert clf.metrics["num_examples"] == 72  # a stratified 20 % of 360
    assert clf.metrics["accuracy"] >= 0.85, clf.metrics["accuracy"]
    assert "roc_auc" not in clf.metrics


def test_gradient_accumulation_equals_a_bigger_batch(tiny_model):
    """Two accumulated half batches give exactly the update of one full batch."""
    import keras
    import tensorflow as tf

    from bertfit.classifier import Classifier
    from bertfit.config import TrainConfig
    from bertfit.modeling import BertClassifier
    from bertfit.training import FineTuner

    rng = np.random.default_rng(0)
    batch = {"token_ids": rng.integers(1000, 2000, (16, 12)).astype("int32"),
             "segment_ids": np.zeros((16, 12), "int32"), "padding_mask": np.ones((16, 12), "int32")}
    labels = rng.integers(0, 2, 16).astype("int32")
    weights = []
    initial = None
    for accumulation in (1, 2):
        keras.utils.set_random_seed(0)
        pretrained = bertfit.load_pretrained(tiny_model)
        net = BertClassifier(pretrained.encoder, 2, dropout=0.0)
        for layer in net._flatten_layers():
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        config = TrainConfig(gradient_accumulation=accumulation, warmup_ratio=0.0, learning_rate=1e-3)
        tuner = FineTuner(Classifier(net, pretrained.tokenizer, ["a", "b"], train_config=config), config,
                          batches_per_epoch=accumulation)
        initial = initial or net.get_weights()
        for part in np.array_split(np.arange(16), accumulation):
            half = {k: v[part] for k, v in batch.items()}
            # The weights of fit's batches: 1 / (rows of the batch x accumulation).
            tuner.train_on_batch(half, labels[part], np.full(len(part), 1 / 16, "float32"))
        assert int(tuner.optimizer.iterations.numpy()) == 1
        weights.append(net.get_weights())
    assert max(np.abs(a - b).max() for a, b in zip(weights[0], initial)) > 1e-4  # the update did happen
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_fused_adam_update_equals_keras_adamw():
    """bertfit's AdamW (one fused update per variable) takes Keras AdamW's steps, also for an embedding
    table's gradient with a row gathered twice (which it sums before clipping, as PyTorch does, so
    Keras is given the summed rows); LLRD scales the step."""
    import keras
    import tensorflow as tf

    from bertfit.training import AdamW

    rng = np.random.default_rng(0)
    start = [rng.normal(size=(30, 8)).astype("float32"), rng.normal(size=(8,)).astype("float32"),
             rng.normal(size=(6, 4)).astype("float32")]
    rows = tf.constant([0, 2, 2, 5, 0])  # gathered rows: 0 and 2 twice, as a repeated token would be

    def gradients():
        dense = [rng.normal(size=a.shape).astype("float32") for a in start[:2]]
        return dense + [tf.IndexedSlices(tf.constant(rng.normal(size=(5, 4)).astype("float32")), rows, tf.constant([6, 4]))]

    grads = [gradients() for _ in range(5)]

    def summed(g):
        return tf.IndexedSlices(tf.math.unsorted_segment_sum(g.values, [0, 1, 1, 2, 0], 3), tf.constant([0, 2, 5]),
                                g.dense_shape)

    def train(cls, steps, sum_rows=False, **options):
        variables = [keras.Variable(a, name=n) for a, n in zip(start, ("kernel", "bias", "table"))]
        options = {"epsilon": 1e-6, "global_clipnorm": 1.0, **options}
        opt = cls(learning_rate=1e-2, **{k: (v(variables) if callable(v) else v) for k, v in options.items()})
        opt.exclude_from_weight_decay(var_names=["bias"])
        opt.build(variables)
        step = tf.function(lambda g: opt.apply_gradients(zip(g, variables)))
        for g in grads[:steps]:
            step([(summed(x) if sum_rows else x) if isinstance(x, tf.IndexedSlices) else tf.constant(x) for x in g])
        return [v.numpy() for v in variables]

    # The gradients' norms are ~16, so every step clips. Epsilon is tiny: where it goes differs (the next test).
    keras_steps = train(keras.optimizers.AdamW, 5, sum_rows=True, weight_decay=0.01, epsilon=1e-12)
    for want, got in zip(keras_steps, train(AdamW, 5, weight_decay=0.01, epsilon=1e-12)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # float rounding of a 1e-2 step
    # Adam's first step moves each weight by lr * sign(gradient) (for epsilon -> 0); a 0.5 multiplier halves that.
    kernel, bias, _ = train(AdamW, 1, weight_decay=0.0, epsilon=1e-12, global_clipnorm=None,
                            lr_multipliers=lambda vs: {vs[0].path: 0.5})
    np.testing.assert_allclose(kernel - start[0], -0.5e-2 * np.sign(grads[0][0]), atol=1e-6)
    np.testing.assert_allclose(bias - start[1], -1e-2 * np.sign(grads[0][1]), atol=1e-6)


def test_adam_epsilon_is_added_as_pytorch_adds_it():
    """Gradients of ~1e-7, where epsilon (1e-8) matters: the steps match PyTorch's AdamW algorithm
    (eps added to sqrt(v / (1 - b2^t))), written out here from its documentation. Keras's placement
    (eps added to sqrt(v)) moves these weights ~30 % less in the first step."""
    import keras
    import tensorflow as tf

    from bertfit.training import AdamW

    rng = np.random.default_rng(1)
    start = rng.normal(size=(50,)).astype("float32")
    grads = [(rng.normal(size=(50,)) * 1e-7).astype("float32") for _ in range(4)]
    lr, wd, eps, b1, b2 = 1e-3, 0.01, 1e-8, 0.9, 0.999
    w, m, v = start.astype("float64"), np.zeros(50), np.zeros(50)
    for t, g in enumerate(grads, 1):
        w = w * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g.astype("float64") ** 2
        w = w - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
    variable = keras.Variable(start, name="kernel")
    opt = AdamW(learning_rate=lr, weight_decay=wd, epsilon=eps, beta_1=b1, beta_2=b2)
    opt.build([variable])
    for g in grads:
        opt.apply_gradients([(tf.constant(g), variable)])
    moved, want = variable.numpy() - start, w - start
    np.testing.assert_allclose(moved, want, rtol=1e-3)


def test_sentence_pairs_use_the_second_text(tiny_model, tmp_path):
    rng = random.Random(4)
    rows = []
    for i in range(400):
        label = "pos" if i % 2 else "neg"
        first = f"the film {rng.choice(POSITIVE + NEGATIVE)} story"  # noise: says nothing about the label
        second = f"it was {rng.choice(POSITIVE if label == 'pos' else NEGATIVE)}"
        rows.append((first, second, label))
    train = write_tsv(tmp_path / "pairs.tsv", ["a", "b", "label"], rows)
    clf = bertfit.fine_tune(train, text="a", pair="b", label="label", model=tiny_model, log=lambda m: None,
                            **dict(FAST, epochs=4))
    assert clf.metrics["accuracy"] >= 0.85, clf.metrics["accuracy"]
    assert clf.predict(["the film good story"], ["it was dreadful"])[0]["label"] == "neg"


def test_multilabel_with_thresholds(tiny_model, tmp_path):
    rng = random.Random(5)
    groups = {"pos": POSITIVE, "neg": NEGATIVE, "meh": ["boring", "dull", "slow", "tedious", "bland"]}
    rows = []
    for _ in range(400):
        chosen = rng.sample(sorted(groups), rng.choice([1, 1, 2]))
        words = [rng.choice(groups[c]) for c in chosen] + ["the", "film", "was"]
        rng.shuffle(words)
        rows.append((" ".join(words), ",".join(chosen)))
    train = write_tsv(tmp_path / "ml.tsv", ["text", "labels"], rows)
    # Mean pooling: through [CLS] the tiny random model learns 2 of the 3 labels on most seeds (F1 ~0.77).
    clf = bertfit.fine_tune(train, label="labels", label_delimiter=",", model=tiny_model, log=lambda m: None,
                            pooling="mean", **dict(FAST, epochs=5))
    m = clf.metrics
    assert clf.multilabel and len(clf.thresholds) == 3
    assert m["f1_macro"] >= 0.95 and "hamming_loss" in m and "subset_accuracy" in m, m["f1_macro"]
    # Each epoch is scored (and the best one chosen) at thresholds tuned as the final model's are:
    # the best epoch's recorded F1 is the final validation F1.
    best = m["history"][m["best_epoch"] - 1]
    assert best["val_f1_macro"] == pytest.approx(m["splits"]["validation"]["f1_macro"], abs=1e-9)
    assert set(clf.predict(["boring and awful"])[0]["label"]) <= {"neg", "meh", "pos"}


def test_multilabel_biases_start_at_label_log_odds(tiny_model, tmp_path):
    # Label shares 30, 10 and 10 of 40 rows; after an epoch at a negligible learning rate the head's
    # biases are still their log-odds (0.5-smoothed).
    rows = [("good film", "a,b") if i % 4 == 0 else ("bad film", "c") if i % 4 == 2 else ("a film", "a")
            for i in range(40)]
    train = write_tsv(tmp_path / "train.tsv", ["text", "labels"], rows)
    dev = write_tsv(tmp_path / "dev.tsv", ["text", "labels"], [("good", "a,b"), ("bad", "c"), ("film", "a")])
    clf = bertfit.fine_tune(train, dev, label="labels", label_delimiter=",", model=tiny_model, log=lambda m: None,
                            **dict(FAST, epochs=1, learning_rate=1e-12))
    counts = {"a": 30, "b": 10, "c": 10}
    want = [math.log((counts[n] + 0.5) / (40 - counts[n] + 0.5)) for n in clf.labels]
    np.testing.assert_allclose(clf.model.classifier.bias.numpy(), want, atol=1e-5)
    # The same labels as JSON lists make a multi-label run without label_delimiter (it was a traceback).
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "labels": y.split(",")}) + "\n" for t, y in rows))
    listed = bertfit.fine_tune(jsonl, {"text": ["good", "bad", "film"], "labels": [["a", "b"], ["c"], ["a"]]},
                               label="labels", model=tiny_model, log=lambda m: None,
                               **dict(FAST, epochs=1, learning_rate=1e-12))
    assert listed.multilabel and listed.labels == clf.labels and len(listed.thresholds) == 3
    np.testing.assert_allclose(listed.model.classifier.bias.numpy(), want, atol=1e-5)


def test_long_text_windows(tiny_model, tmp_path):
    rng = random.Random(6)
    rows = []
    for i in range(240):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(["the", "a", "film", "was", "and", "it"]) for _ in range(50)]
        words.insert(rng.randrange(35, 50), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    train = write_tsv(tmp_path / "long.tsv", ["text", "label"], rows)
    # The keyword sits past the first 32 tokens: only windows can see it.
    clf = bertfit.fine_tune(train, model=tiny_model, long_text="window", window_stride=16, log=lambda m: None,
                            **dict(FAST, epochs=8, learning_rate=3e-3))
    assert clf.metrics["accuracy"] >= 0.85, clf.metrics["accuracy"]


def test_early_stopping(tiny_model, binary_files):
    train, dev = binary_files
    clf = bertfit.fine_tune(train, dev, model=tiny_model, early_stopping=1, log=lambda m: None,
                            **dict(FAST, epochs=5, learning_rate=1e-12))
    assert len(clf.metrics["history"]) == 2  # epoch 2 did not beat epoch 1


def test_training_warns_when_the_model_predicts_one_class(tiny_model, binary_files, tmp_path):
    """Issue 27 item 4: identical texts under two labels (9 to 1) cannot be told apart, so the model
    answers one class for all of them; the run says so in its log and in metrics.json."""
    messages = []
    rows = [("the same message", "ham" if i % 10 else "spam") for i in range(60)]
    train = write_tsv(tmp_path / "same.tsv", ["text", "label"], rows)
    clf = bertfit.fine_tune(train, model=tiny_model, log=messages.append, validation_split=0.5,
                            out=tmp_path / "run", **dict(FAST, epochs=1))
    warning = next(m for m in messages if m.startswith("warning:"))
    assert "the model predicts 'ham' for every validation example" in warning and "class_weight='balanced'" in warning
    assert clf.metrics["warnings"] == [warning.removeprefix("warning: ")]
    # Issue 27 item 3: the report's errors (spam called ham) name lines of the training file, where the
    # held-out examples are, not their position among the held-out examples.
    report = (tmp_path / "run" / "report.html").read_text()
    table = report[report.index("<table class='errors'>"):]
    lines = [int(n) for n in re.findall(r"<tr><td>\d+</td><td>(\d+)</td><td>spam</td><td>ham</td>", table)]
    file_lines = open(train).read().split("\n")
    assert "<th>line</th>" in table and len(lines) == 3 and all(file_lines[n - 1].endswith("\tspam") for n in lines)
    # A model that tells the classes apart gets no such warning.
    good = bertfit.fine_tune(*binary_files, model=tiny_model, log=lambda m: None, **FAST)
    assert good.metrics["accuracy"] >= 0.9 and good.metrics["warnings"] == []


def _train_cmd(train, dev, tiny_model, out):
    return [sys.executable, "-m", "bertfit.cli", "train", train, "--validation", dev, "--model", tiny_model,
            "--out", str(out), "--epochs", "2", "--batch-size", "8", "--learning-rate", "2e-3", "--max-length", "32",
            "--checkpoint-every", "5", "--no-export"]


def test_resume_after_kill_matches_uninterrupted(tiny_model, binary_files, tmp_path):
    train, dev = binary_files
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(train, dev, tiny_model, straight), check=True, env=env, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(train, dev, tiny_model, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    progress = killed / "checkpoints" / "last.json"
    deadline = time.time() + 240
    try:
        # Kill -9 in the middle of epoch 2, after at least one mid-epoch checkpoint.
        while time.time() < deadline:
            if progress.exists():
                state = json.loads(progress.read_text())
                if state["epoch"] == 1 and state["batch"] >= 10:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("no mid-epoch checkpoint appeared")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "metrics.json").exists()
    assert json.loads((killed / "run.json").read_text())["state"] == "training"
    with pytest.raises(BertfitError, match="incomplete") as info:
        bertfit.load(killed)
    assert f"--out {killed} --resume" in str(info.value)  # the command, with the path filled in

    # The run's own data and options: no need to type them again (issue 27, item 1).
    done = subprocess.run([sys.executable, "-m", "bertfit.cli", "train", "--out", str(killed), "--resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming at epoch 2" in done.stderr
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert abs(a["log_loss"] - b["log_loss"]) <= 1e-4 and a["accuracy"] == b["accuracy"]
    # The interrupted epoch's training loss too: its running sum is in the checkpoint (issue 26, item 3).
    for before, after in zip(a["history"], b["history"], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-4), (a["history"], b["history"])
        # And the report's per-step losses: the interrupted epoch's first steps come from the checkpoint.
        assert len(after["step_loss"]) == len(before["step_loss"]) == 40
        np.testing.assert_allclose(after["step_loss"], before["step_loss"], atol=1e-3)


def _small_disk(folder, megabytes):
    """A tmpfs of this size mounted on folder; False where mounting is not allowed."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("limit", ["tmpfs", "ulimit"])
def test_a_full_disk_stops_training_with_one_line_and_no_partial_file(limit, tiny_model, binary_files, tmp_path):
    """Issue 26 items 1-2: a full disk gave three ENOSPC tracebacks and left a checkpoint's temporary
    file behind. Now: one line naming the file and the resume command, exit 2, no part file; with
    space again, --resume finishes the run. A real full disk (a 6 MB tmpfs, where this process may
    mount one) or the kernel's per-file limit (ulimit -f: EFBIG, the same failure of a write)."""
    import resource

    disk, limit_bytes = tmp_path / "disk", 6 << 20
    if limit == "tmpfs" and not _small_disk(disk, 6):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    if limit == "ulimit":
        disk.mkdir()

    def file_limit():  # in the child only; Python ignores SIGXFSZ, so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    train, dev = binary_files
    out = disk / "run"
    try:
        done = subprocess.run(_train_cmd(train, dev, tiny_model, out), capture_output=True, text=True, timeout=300,
                              preexec_fn=file_limit if limit == "ulimit" else None)
        assert done.returncode == 2, done.stderr[-3000:]
        message = [line for line in done.stderr.splitlines() if line.startswith("bertfit: error:")]
        problem = "no space left writing" if limit == "tmpfs" else "over the file-size limit writing"
        assert len(message) == 1 and problem in message[0], done.stderr[-3000:]
        assert f"bertfit train --out {out} --resume" in message[0]
        assert "Traceback" not in done.stderr
        assert not [p for p in out.rglob("*") if ".tmp" in p.name], sorted(out.rglob("*"))
        if limit == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = subprocess.run([sys.executable, "-m", "bertfit.cli", "train", "--out", str(out), "--resume"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "run.json").read_text())["state"] == "complete"
    finally:
        if limit == "tmpfs":
            subprocess.run(["umount", str(disk)], capture_output=True)


def test_resume_refuses_other_data_and_options_and_leaves_a_complete_run_alone(tiny_model, binary_files, tmp_path):
    """Ctrl-C prints the resume command; a resume with a changed option or changed data is refused,
    naming it; the same data under another name is fine; resuming a complete run does nothing."""
    from bertfit.cli import main

    train, dev = binary_files
    data = tmp_path / "train.tsv"
    data.write_bytes(open(train, "rb").read())
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(str(data), dev, tiny_model, run), env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "last.json").exists():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert f"bertfit: interrupted; continue with: bertfit train --out {run} --resume" in err, err[-2000:]
    source = json.loads((run / "source.json").read_text())
    assert source["data"]["train"]["path"] == str(data) and source["command"].startswith("bertfit train ")
    assert len(source["data"]["train"]["sha256"]) == 64 and "test" not in source["data"]

    def resume(*args):
        return main(["train", *map(str, args), "--out", str(run), "--resume"])

    assert resume("--learning-rate", "3e-5", "--epochs", "2") == 2  # --epochs 2 is the run's own: fine
    assert not (run / "metrics.json").exists()
    data.write_bytes(data.read_bytes() + b"an extra row\tpos\n")
    assert resume() == 2
    data.write_bytes(open(train, "rb").read())
    assert resume(train) == 0  # the same content under its first name: the same data
    metrics = (run / "metrics.json").read_text()
    assert json.loads((run / "run.json").read_text())["state"] == "complete"
    assert resume() == 0 and (run / "metrics.json").read_text() == metrics


def test_resume_messages(tiny_model, binary_files, tmp_path, capsys):
    """The words of the refusals above (capsys cannot be shared with a subprocess test's own output)."""
    from bertfit.cli import main

    train, dev = binary_files
    data = tmp_path / "train.tsv"
    data.write_bytes(open(train, "rb").read())
    run = tmp_path / "run"
    assert main(["train", str(data), "--validation", dev, "--model", tiny_model, "--out", str(run), "--epochs", "1",
                 "--max-length", "32", "--no-export", "--keep-checkpoints"]) == 0
    capsys.readouterr()
    assert (run / "checkpoints" / "last.npz").exists() and (run / "checkpoints" / "best.npz").exists()
    (run / "run.json").write_text('{"state": "training"}')  # as if it had been stopped in its last step

    assert main(["train", "--out", str(run), "--resume", "--learning-rate", "3e-5", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "these differ: --learning-rate 3e-05 (the run has 5e-05)" in err and "--epochs" not in err, err
    assert f"Drop them to resume (bertfit train --out {run} --resume)" in err
    with pytest.raises(BertfitError, match=r"these differ: learning_rate=3e-05 \(the run has 5e-05\)\. Drop them "
                                           r"to resume \(fine_tune\(out=.*, resume=True\)\)"):
        bertfit.fine_tune(out=run, resume=True, learning_rate=3e-5)  # the Python API names its keywords
    data.write_bytes(data.read_bytes() + b"an extra row\tpos\n")
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"train data {data} changed since the run started" in err and "resuming would train on other data" in err
    assert main(["train", dev, "--out", str(run), "--resume"]) == 2
    assert f"train data {dev} is not {data}, the file the run started with" in capsys.readouterr().err
    data.unlink()
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert f"was trained on {data} (train data), which is gone" in capsys.readouterr().err

    (run / "run.json").write_text('{"state": "complete"}')
    assert main(["train", "--out", str(run), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{run} is complete: nothing to do" in captured.err and "run folder:" in captured.out
    assert main(["train", "--out", str(tmp_path / "new")]) == 2
    assert "train needs DATA" in capsys.readouterr().err


def test_load_names_what_is_not_a_run_folder(tiny_model, tmp_path):
    """An empty folder or a model checkpoint is 'not a run folder', not an 'incomplete' run (issue 26, item 4)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(BertfitError, match=r"empty: not a bertfit run folder \(no run.json or config.yaml") as info:
        bertfit.load(tmp_path / "empty")
    assert "incomplete" not in str(info.value) and "checkpoint" not in str(info.value)
    with pytest.raises(BertfitError, match="not a bertfit run folder.*holds a model checkpoint.*model="):
        bertfit.load(tiny_model)
    # A run folder whose config.yaml was damaged: one error naming the file, not a YAML traceback.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"state": "complete"}')
    for text, message in (("labels: [a, b", r"config.yaml, line 1, column 14: not valid YAML \(expected ',' or ']'"),
                          ("- a\n- b\n", "config.yaml: expected a mapping of names to values at the top level, not a list"),
                          ("encoder: {}\n", "config.yaml: no 'labels' list")):
        (damaged / "config.yaml").write_text(text)
        with pytest.raises(BertfitError, match=message):
            bertfit.load(damaged)
