"""The exported SavedModel takes raw strings, loads without bertfit, and equals in-process predict."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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


# --- export --format hf (issue 27, item 6) -------------------------------------------------

BENCH_PYTHON = Path(__file__).resolve().parents[1] / ".venv-bench" / "bin" / "python"

# Runs in the benchmarks' environment (PyTorch and transformers, which the project does not install).
HF_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder, texts, pairs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    config = model.config
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=config.bertfit_max_length,
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    multilabel = config.problem_type == "multi_label_classification"
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, -1)
    print(json.dumps({"probabilities": probs.tolist(), "labels": [config.id2label[i] for i in range(len(config.id2label))],
                      "class": type(model).__name__, "ids": batch["input_ids"][0].tolist()}))
""")


def test_export_hf_writes_a_bert_for_sequence_classification_folder(tiny_model, trained, tmp_path):
    from safetensors.numpy import load_file

    from bertfit.checkpoints import read_checkpoint
    from bertfit.errors import BertfitError
    from bertfit.export import export

    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], sentiment_rows(60, seed=3, classes=3))
    clf = bertfit.fine_tune(train, model=tiny_model, epochs=1, batch_size=16, learning_rate=1e-2, max_length=32,
                            export=False, log=lambda m: None)
    folder = export(clf, tmp_path / "run", format="hf")
    assert folder == tmp_path / "run" / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(clf.labels)}
    assert config["problem_type"] == "single_label_classification" and config["bertfit_max_length"] == 32
    tensors = load_file(str(folder / "model.safetensors"))
    # PyTorch's layout: Linear weights are (out, in), so the head is (labels, hidden).
    assert tensors["classifier.weight"].shape == (3, clf.encoder_config.hidden_size)
    np.testing.assert_array_equal(tensors["classifier.weight"], clf.weights()["classifier/kernel"].T)
    assert "bert.pooler.dense.weight" in tensors and "bert.embeddings.word_embeddings.weight" in tensors
    assert (folder / "vocab.txt").read_text().split("\n")[:len(clf.tokenizer.vocab)] == list(clf.tokenizer.vocab)
    # bertfit reads the folder back as a checkpoint: the same encoder and head.
    encoder_config, weights, _, lower_case, meta = read_checkpoint(str(folder))
    for name, value in clf.weights().items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    assert lower_case is True and meta["labels"] == clf.labels
    # Nothing is overwritten; a mean-pooled run cannot be expressed; nothing half-written is left.
    with pytest.raises(BertfitError, match="already exists"):
        export(clf, tmp_path / "run", format="hf")
    with pytest.raises(BertfitError, match="pooling"):
        export(trained[0], tmp_path / "mean", format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.tsv"]


@pytest.mark.slow
@pytest.mark.skipif(not BENCH_PYTHON.exists(), reason="needs .venv-bench (bash bench/setup_anchors.sh): PyTorch and "
                    "transformers, which the project does not install")
@pytest.mark.parametrize("task", ["single", "pairs", "multilabel"])
def test_transformers_loads_the_hf_export_with_the_same_predictions(task, tmp_path):
    """The real MiniLM, fine-tuned briefly, exported and loaded by transformers: the same probabilities."""
    rows = sentiment_rows(48, seed=4)
    if task == "single":
        data = {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
        texts, pairs = ["a great film", "an awful plot, truly dreadful", "ünïcödé ½ ﬁne"], None
    elif task == "pairs":
        data = {"text": [t for t, _ in rows], "pair": [t[::-1] for t, _ in rows], "label": [y for _, y in rows]}
        texts, pairs = ["a great film", "an awful plot"], ["it was superb", "truly dreadful"]
    else:
        data = {"text": [t for t, _ in rows], "label": [[y, "long"] if len(t) > 40 else [y] for t, y in rows]}
        texts, pairs = ["a great film", "an awful plot, truly dreadful and very long indeed"], None
    clf = bertfit.fine_tune(data, text="text", pair="pair" if pairs else None, epochs=1, batch_size=16,
                            max_length=24, export=False, log=lambda m: None)
    from bertfit.export import export

    folder = export(clf, tmp_path, format="hf")
    script = tmp_path / "load.py"
    script.write_text(HF_LOADER)
    done = subprocess.run([str(BENCH_PYTHON), str(script), str(folder), json.dumps(texts), json.dumps(pairs)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["class"] == "BertForSequenceClassification" and got["labels"] == clf.labels
    features = clf.encode(texts[:1], pairs[:1] if pairs else None)  # the longest text is padded by neither
    assert got["ids"][:features.offsets[1]] == features.ids[:features.offsets[1]].tolist()
    np.testing.assert_allclose(np.array(got["probabilities"]), clf.predict_proba(texts, pairs), atol=1e-4)
