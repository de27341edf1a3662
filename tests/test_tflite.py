"""TFLite export: tokenizer inside (tensorflow-text's TFLite ops), float equals the Keras model, int8 is
close and ~4x smaller in its weights; the TFLite packer gives BertTokenizer's ids for every strategy."""

import json

import numpy as np
import pytest
import tensorflow as tf

import bertfit
from bertfit.errors import BertfitError
from bertfit.export import TFTEXT_TFLITE_OPS, TFLiteModule, export, tflite_custom_ops, tflite_interpreter
from conftest import SHARED
from conftest import EDGE_TEXTS, LABELS, random_run

TEXTS = ["a great film", "an awful plot, truly dreadful", *EDGE_TEXTS]


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    return random_run(tiny_model, tmp_path_factory.mktemp("tflite"), saved_model=False)


@pytest.fixture(scope="module")
def clf(run_dir):
    return bertfit.load(run_dir)


@pytest.fixture(scope="module")
def exported(run_dir):
    """`bertfit export RUN --format tflite [--quantize int8]`, to the default paths."""
    from bertfit.cli import main

    assert main(["export", str(run_dir), "--format", "tflite"]) == 0
    assert main(["export", str(run_dir), "--format", "tflite", "--quantize", "int8"]) == 0
    return {None: run_dir / "model.tflite", "int8": run_dir / "model.int8.tflite"}


def run_tflite(path, texts, pairs=None):
    runner = tflite_interpreter(path).get_signature_runner("serving_default")
    inputs = {"text": np.array(texts, dtype=object)}
    if pairs is not None:
        inputs["text_pair"] = np.array(pairs, dtype=object)
    return runner(**inputs)


def constant_bytes_by_type(content: bytes) -> dict:
    """Bytes of constant tensors in a TFLite flatbuffer, by type name (FLOAT32, INT8, UINT8, ...)."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(content, 0)
    sizes = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            data = model.Buffers(tensor.Buffer()).DataLength()
            if data:
                name = names[tensor.Type()]
                sizes[name] = sizes.get(name, 0) + data
    return sizes


def test_default_paths_and_only_tensorflow_text_custom_ops(exported, run_dir):
    assert exported[None] == run_dir / "model.tflite" and exported["int8"] == run_dir / "model.int8.tflite"
    for path in exported.values():
        assert set(tflite_custom_ops(path.read_bytes())) == TFTEXT_TFLITE_OPS  # the tokenizer is inside


def test_float_model_equals_keras_model(exported, clf):
    out = run_tflite(exported[None], TEXTS)
    want = clf.predict_proba(TEXTS)
    np.testing.assert_allclose(out["probabilities"], want, atol=1e-4)
    assert [x.decode() for x in out["label"]] == [LABELS[i] for i in want.argmax(1)]
    # any batch size, one text included
    np.testing.assert_allclose(run_tflite(exported[None], TEXTS[:1])["probabilities"], want[:1], atol=1e-4)


def test_readme_usage_runs_as_written(exported, clf, capsys):
    """The README's TFLite snippet, with RUN/ pointing at this run (issue 27, item 5)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"<!-- tflite-usage .*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    scope = {}
    exec(code.replace('"RUN/', f'"{exported[None].parent}/'), scope)
    want = clf.predict_proba(["a gripping, beautifully shot film", "a dull one"])
    np.testing.assert_allclose(scope["out"]["probabilities"], want, atol=1e-4)
    assert [x.decode() for x in scope["out"]["label"]] == [LABELS[i] for i in want.argmax(1)]
    assert "[[" in capsys.readouterr().out


def test_int8_model_is_close_and_its_weights_4x_smaller(exported, clf):
    want = clf.predict_proba(TEXTS)
    got = run_tflite(exported["int8"], TEXTS)["probabilities"]
    # int8 weights perturb the pooled output by ~1 %; this test head multiplies logits by ~20 (see
    # random_run), so probabilities move by a few hundredths. Accuracy on real data: bench/tflite.py.
    np.testing.assert_allclose(got, want, atol=0.1)
    assert np.abs(got - want).mean() < 0.03
    float_bytes = constant_bytes_by_type(exported[None].read_bytes())
    int8_bytes = constant_bytes_by_type(exported["int8"].read_bytes())
    weights_before = float_bytes["FLOAT32"]
    weights_after = int8_bytes.get("FLOAT32", 0) + int8_bytes.get("INT8", 0)
    assert weights_before / weights_after > 3.5, (float_bytes, int8_bytes)
    # the tokenizer's tables (uint8 buffers: normalizer trie, WordPiece model) are not weights: kept as is
    assert int8_bytes["UINT8"] == float_bytes["UINT8"]
    assert exported["int8"].stat().st_size < exported[None].stat().st_size


def test_pair_model(clf, tmp_path):
    from bertfit.export import export_tflite

    a, b = TEXTS, list(reversed(TEXTS))
    path = export_tflite(clf, tmp_path / "pairs.tflite", pairs=True)  # the tiny model, given pair inputs
    out = run_tflite(path, a, b)
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(a, b), atol=1e-4)


def check_packing(clf, max_lengths, strategies, n_texts):
    """TFLiteModule re-expresses BertTokenizer's ragged packing with dense builtin ops: same ids."""
    from bertfit.tokenization import _check_options

    cases = [json.loads(line) for line in (SHARED / "reference" / "wordpiece_cases.jsonl").open(encoding="utf-8")]
    texts = [c["text"] for c in cases if c["lower_case"]][:n_texts] + EDGE_TEXTS + ["a" * 101 + " " + "é" * 101]
    pairs = list(reversed(texts))
    module = TFLiteModule(clf)
    ids_a, ids_b = module.tokenize(tf.constant(texts)), module.tokenize(tf.constant(pairs))
    want_ids = clf.tokenizer.tokenize(texts)
    np.testing.assert_array_equal(ids_a[0].numpy(), want_ids.flat_values.numpy())
    np.testing.assert_array_equal(ids_a[1].numpy(), want_ids.row_splits.numpy())
    for max_length in max_lengths:
        for truncation in strategies:
            for head_tokens in ([None, 1] if truncation == "head+tail" and (max_length or 0) >= 8 else [None]):
                module.max_length, module.truncation, module.head_tokens = max_length, truncation, head_tokens
                module._check = lambda pair: _check_options(max_length, truncation, head_tokens, pair)
                for b, ids in ((None, None), (pairs, ids_b)):
                    want = clf.tokenizer(texts, b, max_length=max_length, truncation=truncation,
                                         head_tokens=head_tokens)
                    got = module.pack(ids_a, ids)
                    for key in want:
                        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy(),
                                                      err_msg=f"{key} {max_length} {truncation} {head_tokens} {b is not None}")


def test_tflite_packing_equals_bert_tokenizer(clf):
    from bertfit.tokenization import TRUNCATION_STRATEGIES

    check_packing(clf, [12], TRUNCATION_STRATEGIES, 100)


@pytest.mark.slow
def test_tflite_packing_equals_bert_tokenizer_for_every_length_and_strategy(clf):
    from bertfit.tokenization import TRUNCATION_STRATEGIES

    check_packing(clf, [None, 3, 5, 16, 64, 512], TRUNCATION_STRATEGIES, 10_000)


def test_export_errors(clf, run_dir):
    with pytest.raises(BertfitError, match="tflite only"):
        export(clf, run_dir, format="saved_model", quantize="int8")
    with pytest.raises(BertfitError, match="unknown export format"):
        export(clf, run_dir, format="onnx")
    with pytest.raises(BertfitError, match="unknown quantization"):
        export(clf, run_dir, format="tflite", quantize="int4")
