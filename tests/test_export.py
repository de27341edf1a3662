"""The exported SavedModel takes raw strings, loads without bertfit, and equals in-process predict."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bertfit
from conftest import sentiment_rows, write_tsv

TEXTS = ["a great film", "an awful plot, truly dreadful", "", "ünïcödé ½ ﬁne　ｆｕｌｌ"]

# Runs in a clean interpreter whose path holds TensorFlow but not bertfit.
LOADER = textwrap.dedent("""
    import json, sys
    sys.path = [p for p in sys.path if "src" not in p and p not in ("", ".")]
    try:
        import bertfit
        sys.exit("bertfit is importable: the test would prove nothing")
    except ImportError:
        pass
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer ops)
    args = json.loads(sys.argv[2])
    serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    out = serve(**{k: tf.constant(v) for k, v in args.items()})
    print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                      "label": [x.decode() for x in out["label"].numpy()]}))
""")


def run_without_bertfit(saved_model, inputs, tmp_path):
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    done = subprocess.run([sys.executable, "-I", str(script), str(saved_model), json.dumps(inputs)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    train = write_tsv(d / "train.tsv", ["text", "label"], sentiment_rows(200, seed=9))
    clf = bertfit.fine_tune(train, model=tiny_model, out=d / "run", epochs=1, batch_size=16, learning_rate=1e-2,
                            max_length=32, pooling="mean", log=lambda m: None)
    return clf, d / "run"


def test_train_writes_a_saved_model_that_runs_without_bertfit(trained, tmp_path):
    clf, run = trained
    assert (run / "saved_model" / "saved_model.pb").exists()
    got = run_without_bertfit(run / "saved_model", {"text": TEXTS}, tmp_path)
    np.testing.assert_allclose(np.array(got["probabilities"]), clf.predict_proba(TEXTS), atol=1e-5)
    assert got["label"] == [p["label"] for p in clf.predict(TEXTS)]
    # The run was trained with mean pooling: reloading the folder must keep it.
    assert bertfit.load(run).model.pooling == "mean"
    np.testing.assert_allclose(bertfit.load(run).predict_proba(TEXTS), clf.predict_proba(TEXTS), atol=1e-6)
    # Each weight is stored once: the variables file is about the size of the model's weights.
    weight_bytes = sum(np.asarray(w).nbytes for w in clf.model.weights)
    stored = (run / "saved_model" / "variables" / "variables.data-00000-of-00001").stat().st_size
    assert stored < 1.1 * weight_bytes, (stored, weight_bytes)


def test_pair_model_signature(tiny_model, tmp_path):
    rows = [(a, b, lab) for (a, lab), (b, _) in zip(sentiment_rows(80, seed=1), sentiment_rows(80, seed=2))]
    train = write_tsv(tmp_path / "pairs.tsv", ["a", "b", "label"], rows)
    clf = bertfit.fine_tune(train, text="a", pair="b", model=tiny_model, out=tmp_path / "run", epochs=1,
                            max_length=32, log=lambda m: None)
    got = run_without_bertfit(tmp_path / "run" / "saved_model", {"text": TEXTS[:2], "text_pair": TEXTS[2:]}, tmp_path)
    np.testing.assert_allclose(np.array(got["probabilities"]), clf.predict_proba(TEXTS[:2], TEXTS[2:]), atol=1e-5)


def test_window_runs_average_windows_inside_the_saved_model(trained, tmp_path):
    """long_text="window": the SavedModel cuts the same windows as `bertfit predict` and averages them."""
    import dataclasses

    from bertfit.export import export_saved_model

    clf, run = trained
    clf = bertfit.load(run)
    clf.train_config = dataclasses.replace(clf.train_config, long_text="window", max_length=12, window_stride=4)
    # 0 pieces, fewer than a window (10), exactly one, one more, and long texts ending in a strong word.
    words = ["good", "bad", "plot", "film", "acting"]
    texts = ["", "a good film", " ".join(words * 2), " ".join(words * 2 + ["great"]),
             " ".join(words * 9) + " awful", "great " + " ".join(words * 13)]
    rows = clf.encode(texts)
    assert np.bincount(rows.example_index).tolist()[:4] == [1, 1, 1, 2] and len(rows) > 20  # windows are cut
    export_saved_model(clf, tmp_path / "saved_model", pairs=False)
    got = run_without_bertfit(tmp_path / "saved_model", {"text": texts}, tmp_path)
    want = clf.predict_proba(texts)
    np.testing.assert_allclose(np.array(got["probabilities"]), want, atol=1e-5)
    # and the averaging matters: a truncating export would give other probabilities for the long texts
    truncated = dataclasses.replace(clf.train_config, long_text="truncate")
    clf.train_config = truncated
    assert np.abs(clf.predict_proba(texts)[4:] - want[4:]).max() > 1e-4
