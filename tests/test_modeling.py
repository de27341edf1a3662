"""The encoder: shapes, masking, canonical weights, and parity with Hugging Face's BertModel."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from bertfit.config import EncoderConfig
from bertfit.errors import CheckpointError, ConfigError
from bertfit.modeling import BertClassifier, build_encoder, canonical_shapes

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "minilm_l6_outputs.npz"
TINY = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=64)


def batch(token_ids, lengths):
    token_ids = np.asarray(token_ids, "int32")
    mask = (np.arange(token_ids.shape[1])[None] < np.asarray(lengths)[:, None]).astype("int32")
    return {"token_ids": token_ids * mask, "segment_ids": np.zeros_like(token_ids), "padding_mask": mask}


def test_shapes_any_length():
    encoder = build_encoder(TINY)
    for seq in (1, 7, 64):
        out = encoder(batch(np.ones((3, seq)), [seq] * 3))
        assert out["sequence_output"].shape == (3, seq, 32)
        assert out["pooled_output"].shape == (3, 32)


def test_padding_does_not_change_real_positions():
    encoder = build_encoder(TINY)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (2, 5))
    short = encoder(batch(ids, [5, 3]))
    padded = encoder(batch(np.concatenate([ids, rng.integers(1, 100, (2, 9))], axis=1), [5, 3]))
    np.testing.assert_allclose(padded["sequence_output"][0, :5], short["sequence_output"][0], atol=1e-5)
    np.testing.assert_allclose(padded["sequence_output"][1, :3], short["sequence_output"][1, :3], atol=1e-5)
    np.testing.assert_allclose(padded["pooled_output"], short["pooled_output"], atol=1e-5)


def test_canonical_round_trip_and_errors():
    a, b = build_encoder(TINY), build_encoder(TINY)
    inputs = batch(np.arange(1, 11).reshape(2, 5), [5, 4])
    assert not np.allclose(a(inputs)["pooled_output"], b(inputs)["pooled_output"])
    weights = a.get_canonical_weights()
    assert set(weights) == set(canonical_shapes(TINY))
    b.set_canonical_weights(weights)
    np.testing.assert_array_equal(a(inputs)["sequence_output"], b(inputs)["sequence_output"])

    missing = dict(weights)
    del missing["encoder/layer_1/attention/self/key/bias"]
    with pytest.raises(CheckpointError, match="layer_1/attention/self/key/bias.*missing"):
        b.set_canonical_weights(missing)
    wrong = dict(weights, **{"pooler/dense/kernel": np.zeros((32, 33), "float32")})
    with pytest.raises(CheckpointError, match=r"pooler/dense/kernel.*\(32, 33\)"):
        b.set_canonical_weights(wrong)


def test_dropout_only_in_training():
    encoder = build_encoder(TINY)
    inputs = batch(np.arange(1, 11).reshape(2, 5), [5, 5])
    np.testing.assert_array_equal(encoder(inputs)["pooled_output"], encoder(inputs)["pooled_output"])
    assert not np.allclose(encoder(inputs, training=True)["pooled_output"], encoder(inputs)["pooled_output"])


def test_hand_written_gradients_match_autodiff():
    """Training's LayerNorm and GELU gradients (custom on TF) equal TF's autodiff of the plain formulas."""
    import math

    import tensorflow as tf

    from bertfit.modeling import LayerNorm, gelu

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0.3, 2.0, (3, 5, 16)), tf.float32)
    weights = tf.constant(rng.normal(size=(3, 5, 16)), tf.float32)  # a loss that weighs every output
    norm = LayerNorm(epsilon=1e-12)
    norm.build((None, None, 16))
    norm.gamma.assign(rng.normal(1.0, 0.5, 16))
    norm.beta.assign(rng.normal(0.0, 0.5, 16))

    def plain_norm(x):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var + 1e-12) * norm.gamma.value + norm.beta.value

    cases = [(lambda x: norm(x, training=True), plain_norm, [norm.gamma.value, norm.beta.value]),
             (lambda x: gelu(x, training=True), lambda x: 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0))), [])]
    for custom, plain, variables in cases:
        results = []
        for fn in (custom, plain):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.sin(fn(x)) * weights)
            results.append([fn(x), *tape.gradient(loss, [x, *variables])])
        for got, want in zip(*results):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=2e-5)


def test_classifier_head():
    model = BertClassifier(build_encoder(TINY), num_labels=3)
    logits = model(batch(np.ones((4, 6)), [6, 5, 4, 3]))
    assert logits.shape == (4, 3)
    with pytest.raises(CheckpointError, match="classifier/kernel"):
        model.set_head_weights(np.zeros((32, 2), "float32"), np.zeros(2, "float32"))


def test_mean_pooling_head_ignores_padding():
    encoder = build_encoder(TINY)
    model = BertClassifier(encoder, num_labels=3, pooling="mean")
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 100, (2, 6))
    short = batch(ids, [6, 2])
    padded = batch(np.concatenate([ids, rng.integers(1, 100, (2, 5))], axis=1), [6, 2])
    logits = np.asarray(model(padded))
    np.testing.assert_allclose(logits, np.asarray(model(short)), atol=1e-5)
    # The head sees the mean of the real positions' vectors, not [CLS]'s pooler output.
    seq = np.asarray(encoder(short)["sequence_output"])
    means = np.stack([seq[0, :6].mean(0), seq[1, :2].mean(0)])
    want = means @ np.asarray(model.classifier.kernel) + np.asarray(model.classifier.bias)
    np.testing.assert_allclose(logits, want, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        BertClassifier(encoder, num_labels=3, pooling="max")


def test_first_only_last_layer_gives_the_same_logits_and_gradients():
    """A [CLS]-pooled classifier's last layer computes position 0 alone: same outputs, same gradients."""
    import keras
    import tensorflow as tf

    inputs = batch(np.arange(1, 25).reshape(3, 8) % 97 + 1, [8, 5, 2])
    encoder = build_encoder(dataclasses.replace(TINY, hidden_dropout=0.0, attention_dropout=0.0))
    model = BertClassifier(encoder, num_labels=3, dropout=0.0)
    labels = tf.constant([0, 2, 1])

    def logits_and_grads(first_only):
        with tf.GradientTape() as tape:
            out = encoder(inputs, training=True, first_only=first_only)
            logits = model.classifier(out["pooled_output"])
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        return logits, tape.gradient(loss, model.trainable_variables)

    full, full_grads = logits_and_grads(False)
    first, first_grads = logits_and_grads(True)
    np.testing.assert_allclose(first, full, atol=1e-5)
    np.testing.assert_allclose(model(inputs), full, atol=1e-5)  # the classifier takes this path
    for var, a, b in zip(model.trainable_variables, first_grads, full_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b), atol=1e-6, err_msg=var.path)
    assert np.abs(tf.convert_to_tensor(full_grads[0])).max() > 0  # the test compares real gradients


def test_mixed_precision_bf16_runs_and_stays_close():
    import keras

    inputs = batch(np.arange(1, 21).reshape(2, 10), [10, 6])
    reference = build_encoder(TINY)
    weights = reference.get_canonical_weights()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        low = build_encoder(TINY, weights)
        out = low(inputs)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert out["sequence_output"].dtype.name == "bfloat16"
    diff = np.abs(np.asarray(out["pooled_output"], "float32") - np.asarray(reference(inputs)["pooled_output"]))
    assert diff.max() < 0.05


def test_bad_config():
    with pytest.raises(ConfigError, match="divisible"):
        EncoderConfig(hidden_size=30, num_heads=4)


@pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference is absent")
def test_parity_with_reference_minilm():
    from bertfit.checkpoints import load_pretrained

    ref = np.load(REFERENCE)
    encoder = load_pretrained("minilm-l6").encoder
    out = encoder({k: ref[k] for k in ("token_ids", "segment_ids", "padding_mask")})
    real = ref["padding_mask"].astype(bool)
    seq_diff = np.abs(np.asarray(out["sequence_output"]) - ref["last_hidden_state"])[real].max()
    pooled_diff = np.abs(np.asarray(out["pooled_output"]) - ref["pooled_output"]).max()
    assert seq_diff <= 1e-4 and pooled_diff <= 1e-4, (seq_diff, pooled_diff)
    # What a [CLS]-pooled classifier runs: the last layer computes [CLS] alone.
    first = encoder({k: ref[k] for k in ("token_ids", "segment_ids", "padding_mask")}, first_only=True)
    assert first["sequence_output"].shape[1] == 1
    np.testing.assert_allclose(np.asarray(first["sequence_output"])[:, 0], ref["last_hidden_state"][:, 0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(first["pooled_output"]), ref["pooled_output"], atol=1e-4)


def test_import_sets_tensorflows_cpu_options(tmp_path):
    """`import bertfit` turns on oneDNN's kernels and a pooled CPU allocator (unless the user chose):
    oneDNN when bertfit comes before TensorFlow; the pool even when TensorFlow came first, so that a
    big tensor's memory is reused from op to op instead of being page-faulted in again each time."""
    import subprocess
    import sys

    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, sys\n"
        "if sys.argv[1] == 'tf-first':\n"
        "    import tensorflow\n"
        "import bertfit, tensorflow as tf\n"
        "from tensorflow.python.util import _pywrap_util_port\n"
        "x = tf.ones([2048, 2048])\n"
        "square = tf.function(lambda: tf.reduce_sum(tf.square(x)))\n"
        "square()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    square().numpy()\n"
        "print(_pywrap_util_port.IsMklEnabled(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")

    def run(order="bertfit-first", **env):
        base = {k: v for k, v in os.environ.items() if k not in ("TF_CPU_ALLOCATOR_USE_BFC", "TF_ENABLE_ONEDNN_OPTS")}
        out = subprocess.run([sys.executable, str(script), order], env={**base, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[-2] == "True", int(out[-1])

    # A 16 MB tensor is 4,096 pages: fresh memory each call page-faults them all in again.
    onednn, faults = run()
    assert onednn and faults < 2000
    assert run("tf-first")[1] < 2000
    onednn, faults = run(TF_CPU_ALLOCATOR_USE_BFC="false", TF_ENABLE_ONEDNN_OPTS="0")  # the user's choice wins
    assert not onednn and faults > 10 * 4096 / 2
