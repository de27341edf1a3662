"""bertfit.layers and bertfit.optimizer: the TF Hub tutorial's model, built from bertfit parts, trained
with plain Keras, saved as .keras and as a SavedModel of raw strings, checked against the references."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bertfit
from bertfit.errors import BertfitError, ConfigError

import keras  # noqa: E402  (after bertfit: it sets TensorFlow's CPU options)
import tensorflow as tf  # noqa: E402

from conftest import SHARED, sentiment_rows

CASES = [json.loads(line) for line in (SHARED / "reference" / "wordpiece_cases.jsonl").open(encoding="utf-8")]
REFERENCE = SHARED / "reference" / "minilm_l6_outputs.npz"


def unpadded_rows(packed):
    mask = packed["padding_mask"].numpy().astype(bool)
    return [(ids[m].tolist(), seg[m].tolist())
            for ids, seg, m in zip(packed["token_ids"].numpy(), packed["segment_ids"].numpy(), mask)]


@pytest.fixture(scope="module")
def minilm_preprocessor():
    return bertfit.layers.Preprocessor("minilm-l6", max_length=None)


def test_preprocessor_matches_reference_tokenization(minilm_preprocessor):
    singles = [c for c in CASES if c["lower_case"] and "text_pair" not in c]
    pairs = [c for c in CASES if c["lower_case"] and "text_pair" in c]
    assert len(singles) > 500 and len(pairs) > 50
    got = unpadded_rows(minilm_preprocessor(tf.constant([c["text"] for c in singles])))
    assert got == [(c["ids"], c["type_ids"]) for c in singles]
    got = unpadded_rows(minilm_preprocessor([tf.constant([c["text"] for c in pairs]),
                                             tf.constant([c["text_pair"] for c in pairs])]))
    assert got == [(c["ids"], c["type_ids"]) for c in pairs]


def test_preprocessor_in_a_graph_truncates_and_pads():
    pre = bertfit.layers.Preprocessor("minilm-l6", max_length=8, truncation="head+tail", head_tokens=2)
    text = keras.Input(shape=(), dtype="string")
    model = keras.Model(text, pre(text))
    out = model.predict(tf.constant(["one two three four five six seven eight nine", "hi"]), verbose=0)
    vocab = {t: i for i, t in enumerate(pre.tokenizer.vocab)}
    want = ["[CLS]", "one", "two", "six", "seven", "eight", "nine", "[SEP]"]  # 2 head + 4 tail tokens
    assert out["token_ids"][0].tolist() == [vocab[t] for t in want]
    assert out["token_ids"][1].tolist() == [vocab[t] for t in ["[CLS]", "hi", "[SEP]"]] + [0] * 5
    assert out["padding_mask"].tolist() == [[1] * 8, [1] * 3 + [0] * 5]


def test_encoder_matches_reference_outputs():
    ref = np.load(REFERENCE)
    encoder = bertfit.layers.Encoder("minilm-l6")
    inputs = {k: ref[k] for k in ("token_ids", "segment_ids", "padding_mask")}
    for out in (encoder(inputs), tf.function(lambda x: encoder(x))(inputs)):
        mask = ref["padding_mask"].astype(bool)
        np.testing.assert_allclose(out["sequence_output"].numpy()[mask], ref["last_hidden_state"][mask], atol=1e-4)
        np.testing.assert_allclose(out["pooled_output"].numpy(), ref["pooled_output"], atol=1e-4)


def test_layer_errors_name_the_problem(tiny_model):
    with pytest.raises(BertfitError, match="no-such-model"):
        bertfit.layers.Preprocessor("no-such-model")
    with pytest.raises(BertfitError, match="no-such-model"):
        bertfit.layers.Encoder("no-such-model")
    with pytest.raises(ConfigError, match="unknown truncation 'middle'"):
        bertfit.layers.Preprocessor(tiny_model, truncation="middle")
    pre = bertfit.layers.Preprocessor(tiny_model)
    with pytest.raises(ConfigError, match="must be strings.*int32"):
        pre(keras.Input(shape=(), dtype="int32"))
    with pytest.raises(ConfigError, match="one or two batches"):
        pre([tf.constant(["a"])] * 3)
    with pytest.raises(ConfigError, match="total_steps"):
        bertfit.optimizer(total_steps=0)
    with pytest.raises(ConfigError, match="encoder="):
        bertfit.optimizer(total_steps=10, layerwise_lr_decay=0.9)


def tutorial_model(checkpoint, total_steps):
    """The tutorial's model, as the README shows it."""
    text = keras.Input(shape=(), dtype="string")
    x = bertfit.layers.Encoder(checkpoint)(bertfit.layers.Preprocessor(checkpoint)(text))["pooled_output"]
    out = keras.layers.Dense(2)(keras.layers.Dropout(0.1)(x))
    model = keras.Model(text, out)
    model.compile(optimizer=bertfit.optimizer(total_steps=total_steps, learning_rate=1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def sentiment_dataset(n, seed):
    rows = sentiment_rows(n, seed=seed)
    return tf.data.Dataset.from_tensor_slices(([t for t, _ in rows], [int(y == "pos") for _, y in rows]))


def test_tutorial_model_trains_saves_and_exports(tiny_model, tmp_path):
    keras.utils.set_random_seed(0)
    train = sentiment_dataset(256, seed=1).shuffle(256, seed=0).batch(16)
    val = sentiment_dataset(64, seed=2).batch(32)
    model = tutorial_model(tiny_model, total_steps=6 * 16)
    history = model.fit(train, validation_data=val, epochs=6, verbose=0)
    # The label is one keyword among filler words: a 2-layer, 32-wide random BERT learns it.
    assert history.history["val_accuracy"][-1] >= 0.9, history.history
    assert history.history["loss"][-1] < history.history["loss"][0] * 0.5

    texts = ["the film was great and superb", "an awful, dreadful plot", "a very bad movie"]
    expected = model.predict(tf.constant(texts), verbose=0)
    model.save(tmp_path / "model.keras")
    model.export(tmp_path / "saved_model", verbose=False)
    # Neither needs the checkpoint it was built from.
    moved = tmp_path / "moved-away"
    shutil.move(tiny_model, moved)
    try:
        script = tmp_path / "check.py"
        script.write_text(textwrap.dedent(f"""
            import json, sys
            import numpy as np
            texts = {texts!r}
            if sys.argv[1] == "keras":
                import bertfit.layers, keras, tensorflow as tf  # bertfit.layers registers the classes
                model = keras.models.load_model({str(tmp_path / "model.keras")!r})
                out = model.predict(tf.constant(texts), verbose=0)
                assert type(model.optimizer).__name__ == "AdamW" and model.optimizer.no_decay
            else:  # a SavedModel of raw strings, without bertfit
                import tensorflow as tf, tensorflow_text
                loaded = tf.saved_model.load({str(tmp_path / "saved_model")!r})
                out = loaded.serve(tf.constant(texts)).numpy()
                assert "bertfit" not in sys.modules
            print(json.dumps(np.asarray(out).tolist()))
        """))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        for kind in ("keras", "saved_model"):
            done = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, env=env,
                                  timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            np.testing.assert_allclose(json.loads(done.stdout.strip().splitlines()[-1]), expected, atol=1e-5)
    finally:
        shutil.move(moved, tiny_model)


def test_tutorial_binary_model_fits_numpy_object_arrays(tiny_model):
    """The README's model as written: Dense(1, sigmoid), binary_crossentropy, fit(X, y) on the NumPy
    object array of a DataFrame's text column (`.to_numpy()`: with pandas 3, `.values` is an Arrow
    string array, which Keras refuses as it refuses lists and `<U` arrays), then evaluate."""
    import pandas as pd

    keras.utils.set_random_seed(0)
    train, test = (pd.DataFrame(sentiment_rows(n, seed=seed), columns=["text", "label"]) for n, seed in ((256, 3), (64, 4)))
    X, y = train["text"].to_numpy(), (train["label"] == "pos").to_numpy().astype(int)
    X_test, y_test = test["text"].to_numpy(), (test["label"] == "pos").to_numpy().astype(int)
    assert X.dtype == object
    text_input = keras.Input(shape=(), dtype=tf.string, name="text")
    outputs = bertfit.layers.Encoder(tiny_model)(bertfit.layers.Preprocessor(tiny_model)(text_input))
    x = keras.layers.Dropout(0.1)(outputs["pooled_output"])
    x = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(text_input, x)
    epochs, batch_size = 6, 16
    model.compile(optimizer=bertfit.optimizer(total_steps=epochs * len(X) // batch_size, learning_rate=1e-3),
                  loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(X, y, epochs=epochs, batch_size=batch_size, verbose=0)
    loss, accuracy = model.evaluate(X_test, y_test, verbose=0)
    assert accuracy >= 0.9, (loss, accuracy)
    assert model.predict(X_test[:3], verbose=0).shape == (3, 1)


def mrpc_pairs(n):
    import csv

    with open(SHARED / "data" / "mrpc" / "train.tsv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    return [r["#1 String"] for r in rows], [r["#2 String"] for r in rows], [int(r["Quality"]) for r in rows]


def test_pair_model_on_mrpc(tiny_model):
    """Two string Inputs into one Preprocessor: `[CLS] a [SEP] b [SEP]`, the ids bertfit's own
    tokenizer gives the pair, trained with fit on a tf.data pipeline of (dict of strings, label)."""
    first, second, labels = mrpc_pairs(64)
    pre = bertfit.layers.Preprocessor(tiny_model, max_length=64)
    a = keras.Input(shape=(), dtype=tf.string, name="sentence1")
    b = keras.Input(shape=(), dtype=tf.string, name="sentence2")
    x = bertfit.layers.Encoder(tiny_model)(pre([a, b]))["pooled_output"]
    model = keras.Model([a, b], keras.layers.Dense(2)(x))
    model.compile(optimizer=bertfit.optimizer(total_steps=4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices(({"sentence1": first, "sentence2": second}, labels)).batch(16)
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    got = unpadded_rows(pre([tf.constant(first), tf.constant(second)]))
    tokenizer = bertfit.load_pretrained(tiny_model).tokenizer
    want = unpadded_rows(tokenizer(first, second, max_length=64))
    assert got == want
    ids, segments = got[0]
    sep = tokenizer.vocab.index("[SEP]")
    assert ids[0] == tokenizer.vocab.index("[CLS]") and ids[-1] == sep and ids.count(sep) == 2
    assert segments[ids.index(sep) + 1] == 1 and segments[0] == 0 and len(ids) <= 64
    assert any(len(ids) == 64 for ids, _ in got)  # some pairs were truncated


def test_optimizer_is_the_recipe(tiny_model):
    encoder = bertfit.layers.Encoder(tiny_model)
    opt = bertfit.optimizer(total_steps=100, learning_rate=2e-5, layerwise_lr_decay=0.5, encoder=encoder)
    schedule = opt.learning_rate if callable(opt.learning_rate) else opt._learning_rate
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    np.testing.assert_allclose(rates, [0.0, 1e-5, 2e-5, 1e-5, 0.0], rtol=1e-6)  # 10 warmup steps, then linear
    opt.build(encoder.trainable_variables)
    decayed = {v.path for v in encoder.trainable_variables if opt._use_weight_decay(v)}
    assert decayed and all(p.endswith(("kernel", "embeddings")) for p in decayed)
    scales = dict(zip([v.path for v in encoder.trainable_variables], opt._scales))
    assert scales["encoder/embeddings/word_embeddings"] == 0.25  # 2 layers: embeddings 0.5**2
    assert scales["encoder/layer_0/qkv/kernel"] == 0.5 and scales["encoder/layer_1/qkv/kernel"] == 1.0
    assert scales["encoder/pooler/kernel"] == 1.0


MIRRORED_STEP = """
import json, sys
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import bertfit, keras
import numpy as np

def one_step(strategy):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.integers(0, 3, 8)
    with strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        # clipnorm well under the gradient's norm: clipping each replica's part would differ
        model.compile(optimizer=bertfit.optimizer(total_steps=1, warmup_ratio=0.0, learning_rate=0.1,
                                                  clipnorm=1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0)
    return [w.tolist() for w in model.get_weights()]

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(json.dumps({"one": one_step(tf.distribute.get_strategy()), "two": one_step(mirrored),
                  "replicas": mirrored.num_replicas_in_sync}))
"""


def test_optimizer_sums_replicas_before_clipping(tmp_path):
    """With Keras's fit under MirroredStrategy, a step on 2 replicas is the step on the whole batch."""
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_STEP)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    for one, two in zip(result["one"], result["two"]):
        np.testing.assert_allclose(two, one, atol=1e-7)
