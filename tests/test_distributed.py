"""Scale-out: two MultiWorkerMirroredStrategy workers on loopback (CPU), the data split across
them, only the chief writing; and mixed precision / XLA giving the metrics of float32.

The two-worker run matches a one-process run with the same global batch and seed because every
worker builds the same batch plan, each replica trains on its slice of the global batch with the
loss divided by the global batch size, and the gradients are summed across workers before
clipping: the update is the one-process update up to float rounding. Dropout is 0 here, since
each replica draws its own dropout masks (the streams differ from one process's).
"""

import json
import os
import socket
import sys
import textwrap

import numpy as np
import pytest

import bertfit
from conftest import run_together, sentiment_rows, write_tsv

RECIPE = dict(epochs=2, batch_size=16, learning_rate=2e-3, warmup_ratio=0.0, dropout=0.0, metric="loss",
              max_length=32, export=False, seed=3)
N_TRAIN = 150  # 10 batches of 16 per epoch, the last one of 6 rows (3 per worker)

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    from bertfit import training

    train, dev, model, out, result = sys.argv[1:6]
    recipe = json.loads(sys.argv[6])
    seen = []  # per step: the (unpadded) token rows this worker's replica trained on

    original = training.FineTuner._gradients

    def spy(self, inputs, labels, weights):
        def record(ids, mask):
            seen.append([[int(t) for t, m in zip(row, keep) if m] for row, keep in zip(ids.numpy(), mask.numpy())])
            return np.int32(0)

        done = tf.py_function(record, [inputs["token_ids"], inputs["padding_mask"]], tf.int32)
        with tf.control_dependencies([done]):
            inputs = {**inputs, "token_ids": tf.identity(inputs["token_ids"])}
        return original(self, inputs, labels, weights)

    training.FineTuner._gradients = spy
    clf = training.fine_tune(train, dev, model=model, out=out, strategy="multi-worker", log=lambda m: None, **recipe)
    np.savez(result + ".npz", *clf.model.get_weights())
    with open(result + ".json", "w") as f:
        json.dump({"seen": seen, "history": clf.metrics["history"],
                   "run_dir": None if clf.run_dir is None else str(clf.run_dir)}, f)
""")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist-data")
    # A distinct last word makes every training text (and so its token row) unique.
    rows = [(f"{text} item{i}", label) for i, (text, label) in enumerate(sentiment_rows(N_TRAIN, seed=11))]
    return (write_tsv(d / "train.tsv", ["text", "label"], rows),
            write_tsv(d / "dev.tsv", ["text", "label"], sentiment_rows(40, seed=12)), [r[0] for r in rows])


@pytest.fixture(scope="module")
def cluster(tiny_model, data, tmp_path_factory):
    """Run the two-worker training once; both tests below read its results."""
    train, dev, _ = data
    d = tmp_path_factory.mktemp("cluster")
    script = d / "worker.py"
    script.write_text(WORKER)
    ports = _free_ports(2)
    cluster_spec = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    envs = [dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
                 TF_CONFIG=json.dumps({"cluster": cluster_spec, "task": {"type": "worker", "index": i}}))
            for i in range(2)]
    commands = [[sys.executable, str(script), train, dev, tiny_model, str(d / f"out{i}"), str(d / f"result{i}"),
                 json.dumps(RECIPE)] for i in range(2)]
    for code, log in run_together(commands, envs, [d / "worker0.log", d / "worker1.log"], timeout=480):
        assert code == 0, log[-3000:]
    results = []
    for i in range(2):
        with np.load(d / f"result{i}.npz") as f:
            weights = [f[f"arr_{k}"] for k in range(len(f.files))]
        results.append({"weights": weights, **json.loads((d / f"result{i}.json").read_text())})
    return d, results


def test_two_workers_match_one_process(cluster, tiny_model, data):
    d, (chief, worker) = cluster
    train, dev, _ = data
    for a, b in zip(chief["weights"], worker["weights"]):
        np.testing.assert_array_equal(a, b)  # the same all-reduced update on both workers

    single = bertfit.fine_tune(train, dev, model=tiny_model, log=lambda m: None, **RECIPE)
    for a, b in zip(single.model.get_weights(), chief["weights"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    for h1, h2 in zip(single.metrics["history"], chief["history"]):
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-5)

    # Only the chief (worker 0) wrote the run folder; the other worker wrote nothing.
    assert json.loads((d / "out0" / "run.json").read_text())["state"] == "complete"
    assert bertfit.load(d / "out0").predict(["a great film"])[0]["label"] in ("pos", "neg")
    assert not (d / "out1").exists()
    assert chief["run_dir"] == str(d / "out0") and worker["run_dir"] is None  # what `bertfit train` reports


def test_each_example_once_per_epoch_across_the_cluster(cluster, tiny_model, data):
    _, (chief, worker) = cluster
    _, _, texts = data
    from bertfit import features

    tokenizer = bertfit.load_pretrained(tiny_model).tokenizer
    rows = features.encode(tokenizer, texts, max_length=RECIPE["max_length"])
    index = {tuple(int(t) for t in rows.row(i)): i for i in range(len(rows))}
    assert len(index) == N_TRAIN  # every row is distinct, so a row names its example

    steps_per_epoch = -(-N_TRAIN // RECIPE["batch_size"])
    assert len(chief["seen"]) == len(worker["seen"]) == RECIPE["epochs"] * steps_per_epoch
    for epoch in range(RECIPE["epochs"]):
        used = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            a = [index[tuple(r)] for r in chief["seen"][step]]
            b = [index[tuple(r)] for r in worker["seen"][step]]
            assert abs(len(a) - len(b)) <= 1 and not set(a) & set(b)  # halves of one global batch
            used += a + b
        assert sorted(used) == list(range(N_TRAIN)), f"epoch {epoch + 1}"
    # The two epochs are shuffled differently.
    assert chief["seen"][:steps_per_epoch] != chief["seen"][steps_per_epoch:]


def test_replica_rows_cover_the_batch():
    from bertfit.training import replica_rows

    for batch in (1, 5, 16, 17):
        for n in (1, 2, 3, 4):
            covered = []
            for r in range(n):
                start, stop = replica_rows(batch, n, r)
                covered += list(range(batch))[start:stop]
            assert covered == list(range(batch))


def test_multi_worker_needs_tf_config(tiny_model, data, monkeypatch):
    from bertfit.errors import ConfigError

    train, dev, _ = data
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        bertfit.fine_tune(train, dev, model=tiny_model, strategy="multi-worker", log=lambda m: None)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG must be JSON"):
        bertfit.fine_tune(train, dev, model=tiny_model, strategy="multi-worker", log=lambda m: None)


def test_is_chief():
    import tensorflow as tf

    from bertfit.training import is_chief

    class Fake:
        def __init__(self, spec, task_type, task_id):
            self.cluster_resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
                tf.train.ClusterSpec(spec), task_type=task_type, task_id=task_id)

    workers = {"worker": ["a:1", "b:1"]}
    assert is_chief(Fake(workers, "worker", 0)) and not is_chief(Fake(workers, "worker", 1))
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert is_chief(Fake(with_chief, "chief", 0))
    assert not is_chief(Fake(with_chief, "worker", 0))  # not a second writer
    assert is_chief(tf.distribute.get_strategy())


# -- mixed precision and XLA ----------------------------------------------------------------


def _train_steps(steps=3, **options):
    """A few training steps of a tiny random BERT on a fixed batch: (FineTuner, losses, initial and final
    weights). Dropout 0, so that runs are comparable."""
    import keras
    import tensorflow as tf

    from bertfit.classifier import Classifier
    from bertfit.config import EncoderConfig, TrainConfig
    from bertfit.modeling import BertClassifier, build_encoder
    from bertfit.training import FineTuner, dtype_policy

    config = TrainConfig(learning_rate=1e-3, warmup_ratio=0.0, dropout=0.0, **options)
    keras.utils.set_random_seed(0)
    encoder_config = EncoderConfig(vocab_size=2000, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                   max_positions=64, hidden_dropout=0.0, attention_dropout=0.0)
    with dtype_policy(config.mixed_precision):
        net = BertClassifier(build_encoder(encoder_config), 2, dropout=0.0)
    tuner = FineTuner(Classifier(net, None, ["a", "b"], train_config=config), config, batches_per_epoch=steps)
    rng = np.random.default_rng(0)
    batch = {"token_ids": rng.integers(1000, 2000, (8, 10)).astype("int32"),
             "segment_ids": np.zeros((8, 10), "int32"), "padding_mask": np.ones((8, 10), "int32")}
    batch["padding_mask"][:4, 7:] = 0
    labels = rng.integers(0, 2, 8).astype("int32")
    initial = [np.asarray(w, "float32") for w in net.get_weights()]
    weights = np.full(8, 1 / 8, "float32")
    losses = [float(tuner.train_on_batch(batch, labels, weights, return_dict=True)["loss"]) for _ in range(steps)]
    return tuner, losses, initial, [np.asarray(w, "float32") for w in net.get_weights()]


def test_mixed_precision_and_jit_steps_match_float32():
    import keras

    _, base_losses, initial, base_weights = _train_steps()
    _, losses, _, weights = _train_steps(jit=True)
    np.testing.assert_allclose(losses, base_losses, atol=1e-5)
    for a, b in zip(weights, base_weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    moved = np.concatenate([(b - a).ravel() for a, b in zip(initial, base_weights)])
    for precision, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        tuner, losses, _, weights = _train_steps(mixed_precision=precision)
        assert tuner.net.encoder.encoder_layers[0].qkv.compute_dtype == dtype
        assert keras.mixed_precision.dtype_policy().name == "float32"  # the global policy is restored
        assert int(tuner.optimizer.iterations.numpy()) == 3  # no step skipped
        np.testing.assert_allclose(losses, base_losses, atol=0.02)
        # The weights moved as in float32: the update, not only the loss, survives the lower precision.
        got = np.concatenate([(b - a).ravel() for a, b in zip(initial, weights)])
        cos = float(moved @ got / np.sqrt((moved @ moved) * (got @ got)))
        assert cos > 0.95, (precision, cos)
        if precision == "fp16":  # trained through Keras' LossScaleOptimizer (dynamic scale from 2**15)
            assert isinstance(tuner.optimizer, keras.optimizers.LossScaleOptimizer)
            assert float(tuner.optimizer.dynamic_scale.numpy()) == 2.0 ** 15


@pytest.mark.slow
def test_mixed_precision_and_jit_fine_tune_like_float32(tiny_model, tmp_path):
    import keras

    # Texts of one token length: few distinct batch shapes, so XLA compiles little.
    rows = [("the film was good", "pos") if i % 2 else ("the film was bad", "neg") for i in range(96)]
    train = write_tsv(tmp_path / "train.tsv", ["text", "label"], rows)
    recipe = dict(epochs=3, batch_size=8, learning_rate=1e-2, max_length=16, export=False, seed=0,
                  validation_split=0.25, metric="loss")
    results = {}
    for name, extra in {"fp32": {}, "jit": {"jit": True}, "bf16": {"mixed_precision": "bf16"},
                        "fp16": {"mixed_precision": "fp16"}}.items():
        results[name] = bertfit.fine_tune(train, model=tiny_model, log=lambda m: None, **recipe, **extra).metrics
        assert keras.mixed_precision.dtype_policy().name == "float32"
    base = results["fp32"]
    assert base["accuracy"] == 1.0
    assert results["jit"]["log_loss"] == pytest.approx(base["log_loss"], abs=1e-4)
    for name in ("bf16", "fp16"):
        assert results[name]["accuracy"] == base["accuracy"]
        assert results[name]["log_loss"] == pytest.approx(base["log_loss"], abs=0.03), name
