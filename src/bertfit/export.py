"""Export: a SavedModel whose serving signature takes raw strings (tokenizer inside the graph).

The SavedModel loads with plain `tf.saved_model.load` after `import tensorflow_text`; bertfit
need not be installed where it runs, and TF Serving serves its `serving_default` signature.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import tensorflow as tf


def _attach_classifier(module: tf.Module, clf):
    """What both exports carry: the Keras model, label names, thresholds and truncation settings."""
    module.model = clf.model
    module.label_names = tf.constant(clf.labels)
    module.multilabel = clf.multilabel
    thresholds = clf.thresholds if clf.thresholds is not None else [0.5] * len(clf.labels)
    module.thresholds = tf.constant(thresholds, tf.float32)
    c = clf.train_config
    module.max_length, module.truncation, module.head_tokens = c.max_length, c.truncation, c.head_tokens
    module.long_text, module.window_stride = c.long_text, c.window_stride


class ServingModule(tf.Module):
    """Tokenizer + classifier + label names, with `serving_default`: text (, text_pair) -> probabilities, label."""

    def __init__(self, clf):
        super().__init__(name="bertfit")
        self.tokenizer = clf.tokenizer
        _attach_classifier(self, clf)

    def classify(self, text, text_pair=None):
        if self.long_text == "window":
            probs = self._window_probabilities(text)
        else:
            packed = self.tokenizer(text, text_pair, max_length=self.max_length, truncation=self.truncation,
                                    head_tokens=self.head_tokens)
            probs = self._probabilities(packed)
        if self.multilabel:
            chosen = tf.ragged.boolean_mask(tf.broadcast_to(self.label_names, tf.shape(probs)), probs >= self.thresholds)
            label = tf.strings.reduce_join(chosen, axis=1, separator=",")
        else:
            label = tf.gather(self.label_names, tf.argmax(probs, axis=1))
        return {"probabilities": probs, "label": label}

    def _probabilities(self, packed):
        logits = tf.cast(self.model(packed, training=False), tf.float32)
        return tf.sigmoid(logits) if self.multilabel else tf.nn.softmax(logits)

    def _window_probabilities(self, text):
        """long_text="window" as `bertfit.features` does it: overlapping windows of max_length - 2
        word pieces, `stride` apart, each [CLS] window [SEP]; their probabilities averaged per text."""
        ids = self.tokenizer.tokenize(text)
        width = self.max_length - 2
        stride = self.window_stride or max(1, width // 2)
        n = ids.row_lengths()
        # per text: len(range(0, max(1, n - width + stride), stride)) windows, as features._windows cuts
        windows = (tf.maximum(n - width + stride, 1) + stride - 1) // stride
        window_text = tf.repeat(tf.range(tf.size(n, tf.int64)), windows)
        first = tf.cumsum(windows, exclusive=True)
        start = (tf.range(tf.reduce_sum(windows)) - tf.gather(first, window_text)) * stride
        length = tf.minimum(tf.cast(width, tf.int64), tf.gather(n, window_text) - start)
        offset = tf.gather(ids.row_splits, window_text) + start
        pieces = tf.gather(ids.flat_values, tf.ragged.range(offset, offset + length).flat_values)
        packed = self.tokenizer.pack(tf.RaggedTensor.from_row_lengths(pieces, length), max_length=self.max_length)
        return tf.math.unsorted_segment_mean(self._probabilities(packed), window_text, tf.size(n, tf.int64))


def export_saved_model(clf, directory, pairs: bool | None = None) -> Path:
    """Write the SavedModel atomically (to a temporary folder, then renamed into place)."""
    import keras

    directory = Path(directory)
    pairs = clf.data_config.pair_column is not None if pairs is None else pairs
    module = ServingModule(clf)
    text = tf.TensorSpec([None], tf.string, name="text")
    # ExportArchive saves the variables the endpoint uses, without Keras's own float-typed default
    # signature. (No archive.track(model): that saved every weight a second time, as Keras variables
    # beside the tf.Variables the endpoint captures: twice the size on disk.)
    archive = keras.export.ExportArchive()
    if pairs:
        signature = [text, tf.TensorSpec([None], tf.string, name="text_pair")]
        archive.add_endpoint("serving_default", lambda text, text_pair: module.classify(text, text_pair), signature)
    else:
        archive.add_endpoint("serving_default", lambda text: module.classify(text), [text])
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    archive.write_out(str(tmp), verbose=False)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


# --- export(): one entry point for `bertfit export` -----------------------------------------

FORMATS = ("saved_model", "tflite", "hf")


def export(clf, run_dir, format: str = "saved_model", quantize: str | None = None, out=None) -> Path:
    """Export a classifier: a SavedModel (default `RUN/saved_model`) or a TFLite model
    (`RUN/model.tflite`, or `RUN/model.int8.tflite` with `quantize="int8"`). Returns the path written."""
    from .errors import BertfitError

    if format not in FORMATS:
        raise BertfitError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise BertfitError(f"unknown quantization {quantize!r}; the choice is int8 (TFLite dynamic-range)")
    run_dir = Path(run_dir)
    if format == "saved_model":
        if quantize:
            raise BertfitError("--quantize applies to --format tflite only")
        return export_saved_model(clf, Path(out) if out else run_dir / "saved_model")
    if format == "hf":
        if quantize:
            raise BertfitError("--quantize applies to --format tflite only")
        return export_huggingface(clf, Path(out) if out else run_dir / "hf")
    path = Path(out) if out else run_dir / ("model.int8.tflite" if quantize else "model.tflite")
    return export_tflite(clf, path, quantize=quantize)


def export_huggingface(clf, directory) -> Path:
    """A Hugging Face folder that `transformers.AutoModelForSequenceClassification` and
    `AutoTokenizer` load: config.json (BertForSequenceClassification, id2label, problem_type),
    model.safetensors in PyTorch's key layout, vocab.txt and tokenizer_config.json.

    transformers' class reads BERT's pooler on [CLS], so a run trained with pooling "mean" is refused.
    What it does not carry: a multi-label run's per-label thresholds (kept in config.json as
    `bertfit_thresholds`; transformers' pipeline uses 0.5), the run's max_length and truncation
    (`bertfit_max_length`, `bertfit_truncation`; pass them to the tokenizer), and long_text="window".
    Written into a temporary folder beside the target and renamed, so nothing half-written is left.
    """
    from .checkpoints import write_huggingface
    from .checkpoints._common import read_json, write_json
    from .config import option
    from .errors import BertfitError

    c = clf.train_config
    if c.pooling != "cls":
        raise BertfitError(f"this run was trained with {option('pooling', c.pooling)}; transformers' "
                           "BertForSequenceClassification reads the pooler on [CLS] (pooling cls) and cannot express it")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BertfitError(f"{directory}: already exists; remove it or pass another {option('out')}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_huggingface(tmp, clf.encoder_config, clf.weights(), clf.tokenizer.vocab, clf.tokenizer.lower_case,
                          layout="BertForSequenceClassification", labels=clf.labels)
        config = read_json(tmp / "config.json")
        config.update(problem_type="multi_label_classification" if clf.multilabel else "single_label_classification",
                      bertfit_max_length=c.max_length, bertfit_truncation=c.truncation)
        if clf.multilabel:
            config["bertfit_thresholds"] = [float(t) for t in (clf.thresholds if clf.thresholds is not None
                                                               else [0.5] * len(clf.labels))]
        write_json(tmp / "config.json", config)
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


# --- TFLite -------------------------------------------------------------------------------
#
# The tokenizer is inside the TFLite model. tensorflow-text ships TFLite kernels for
# FastBertNormalize and FastWordpieceTokenizeWithOffsets (tensorflow_text.tflite_registrar,
# registered into an interpreter as custom ops), which are exactly the two tokenizer ops
# bertfit uses (bertfit's normalization is FastBertNormalize with its own table; it has no
# regex_replace or normalize_utf8, which have no TFLite kernels). What did not convert is the rest
# of BertTokenizer's graph: converting `ServingModule.classify` as it is leaves RaggedGather
# (gathers of ragged rows), UpperBound (searchsorted, in the rare-word fix-up) and
# UnsortedSegmentSum (int64 segment ids, from ragged masks) as custom ops that neither TFLite nor
# tensorflow-text implements (tensorflow-text does have RaggedTensorToTensor). Select TF ops
# (Flex) would run them, but only in runtimes linked with the large Flex delegate, which standard
# TFLite/LiteRT builds do not include. So `TFLiteModule` re-expresses those steps with dense
# builtin ops only (GATHER, CUMSUM, SEGMENT_SUM, SELECT_V2, RANGE, ...) and gives identical ids:
#   - words of 101..400 bytes: BertTokenizer first tokenizes with a 100-byte word limit and
#     redoes rows with [UNK] at a 400-byte limit, counting characters. Both limits agree on
#     every word of up to 100 bytes, so here every row is tokenized once at the 400-byte limit
#     and words of over 100 characters are folded into one [UNK] (same rule, no row selection);
#   - packing [CLS] a [SEP] (b [SEP]) with truncation: computed per output position by index
#     arithmetic from the ragged values and row splits, using the tokenizer's own closed-form
#     truncation helpers, so every truncation strategy gives the same ids as `BertTokenizer.pack`.
# Not in the TFLite model: long_text="window" averaging (the SavedModel has it; TFLite truncates), and
# for multi-label models the comma-joined label string (string joins are not TFLite ops): the
# model returns `probabilities` and `predicted` (0/1 per label at the run's thresholds) instead.


class TFLiteModule(tf.Module):
    """Raw strings -> probabilities (and label) with TFLite builtins + tensorflow-text's TFLite ops."""

    def __init__(self, clf):
        from .tokenization import _check_options

        super().__init__(name="bertfit_tflite")
        tok = clf.tokenizer
        _attach_classifier(self, clf)
        self.normalizer_model, self.wordpiece_model = tok._normalizer_model, tok._wordpiece_long_model
        self.starts_word, self.piece_chars = tok._starts_word, tok._piece_chars
        self.cls_id, self.sep_id, self.pad_id, self.unk_id = tok.cls_id, tok.sep_id, tok.pad_id, tok.unk_id
        c = clf.train_config
        self._check = lambda pair: _check_options(c.max_length, c.truncation, c.head_tokens, pair)

    def tokenize(self, texts):
        """Word-piece ids as (flat values int32 [n], row splits int32 [batch + 1]), as BertTokenizer.tokenize."""
        from .tokenization import MAX_CHARS_PER_WORD, _normalize, _wordpiece

        ids = _wordpiece(_normalize(texts, self.normalizer_model), self.wordpiece_model)
        flat, splits = ids.flat_values, tf.cast(ids.row_splits, tf.int32)
        starts = tf.gather(self.starts_word, flat)
        word = tf.cumsum(tf.cast(starts, tf.int32)) - 1
        chars = tf.math.segment_sum(tf.gather(self.piece_chars, flat), word)
        too_long = tf.gather(chars > MAX_CHARS_PER_WORD, word)
        # A word of over 100 characters becomes one [UNK]: its first piece turns to [UNK], the rest go.
        keep = tf.logical_or(starts, tf.logical_not(too_long))
        flat = tf.boolean_mask(tf.where(too_long, self.unk_id, flat), keep)
        kept_before = tf.concat([[0], tf.cumsum(tf.cast(keep, tf.int32))], axis=0)
        return flat, tf.gather(kept_before, splits)

    def pack(self, a, b=None):
        """Dense token_ids, segment_ids, padding_mask [batch, longest row], as BertTokenizer.pack."""
        from .tokenization import _head_count, _kept_lengths

        budget = self._check(b is not None)
        (flat_a, splits_a) = a
        len_a = splits_a[1:] - splits_a[:-1]
        len_b = tf.zeros_like(len_a) if b is None else b[1][1:] - b[1][:-1]
        keep_a, keep_b = _kept_lengths(len_a, len_b, budget, self.truncation)
        head_a = _head_count(keep_a, self.truncation, self.head_tokens)
        total = keep_a + 2 + (0 if b is None else keep_b + 1)
        pos = tf.range(tf.reduce_max(tf.concat([total, [0]], axis=0)))[None, :]  # [1, width]

        def pieces(flat, splits, length, keep, head, start):
            """Ids of a segment whose kept tokens fill positions start .. start + keep - 1."""
            p = pos - start[:, None]  # index among the kept tokens
            inside = tf.logical_and(p >= 0, p < keep[:, None])
            source = tf.where(p < head[:, None], p, p + (length - keep)[:, None])  # first `head`, then the tail
            index = tf.clip_by_value(splits[:-1, None] + source, 0, tf.maximum(tf.size(flat) - 1, 0))
            values = tf.gather(tf.concat([flat, [self.pad_id]], axis=0), index)  # never empty
            return inside, values

        pad = tf.fill(tf.shape(pos + total[:, None]), self.pad_id)
        in_a, ids_a = pieces(flat_a, splits_a, len_a, keep_a, head_a, tf.ones_like(len_a))
        sep_a = pos == (keep_a + 1)[:, None]
        token_ids = tf.where(pos == 0, self.cls_id, tf.where(in_a, ids_a, tf.where(sep_a, self.sep_id, pad)))
        segment_ids = tf.zeros_like(token_ids)
        if b is not None:
            head_b = _head_count(keep_b, self.truncation, self.head_tokens)
            in_b, ids_b = pieces(b[0], b[1], len_b, keep_b, head_b, keep_a + 2)
            sep_b = pos == (keep_a + keep_b + 2)[:, None]
            token_ids = tf.where(in_b, ids_b, tf.where(sep_b, self.sep_id, token_ids))
            segment_ids = tf.where(tf.logical_or(in_b, sep_b), 1, segment_ids)
        padding_mask = tf.cast(pos < total[:, None], tf.int32)
        return {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask}

    def classify(self, text, text_pair=None):
        b = None if text_pair is None else self.tokenize(text_pair)
        logits = tf.cast(self.model(self.pack(self.tokenize(text), b), training=False), tf.float32)
        if self.multilabel:
            probs = tf.sigmoid(logits)
            return {"probabilities": probs, "predicted": tf.cast(probs >= self.thresholds, tf.int32)}
        probs = tf.nn.softmax(logits)
        return {"probabilities": probs, "label": tf.gather(self.label_names, tf.argmax(probs, axis=1))}


def tflite_signature(clf, pairs: bool | None = None):
    """(module, function, input specs) that the TFLite model is converted from; the function also
    runs in TensorFlow, which lets tests compare its packing with BertTokenizer's."""
    module = TFLiteModule(clf)
    pairs = clf.data_config.pair_column is not None if pairs is None else pairs
    specs = [tf.TensorSpec([None], tf.string, name="text")]
    if pairs:
        specs.append(tf.TensorSpec([None], tf.string, name="text_pair"))
        return module, (lambda text, text_pair: module.classify(text, text_pair)), specs
    return module, (lambda text: module.classify(text)), specs


def export_tflite(clf, path, quantize: str | None = None, pairs: bool | None = None) -> Path:
    """Write a TFLite model (tokenizer inside; needs tensorflow-text's TFLite ops registered)."""
    import sys

    path = Path(path)
    if clf.train_config.long_text == "window":
        print("note: the TFLite model truncates long texts; window averaging is not exported", file=sys.stderr)
    import tempfile

    import keras

    module, fn, specs = tflite_signature(clf, pairs)
    with tempfile.TemporaryDirectory() as tmp_dir:
        # Converting from a SavedModel (rather than from a concrete function) gives the TFLite
        # model its `serving_default` signature with named inputs and outputs. ExportArchive, as
        # in export_saved_model, saves the Keras model's variables without Keras's own signature.
        archive = keras.export.ExportArchive()
        archive.track(clf.model)
        archive.bertfit_tflite = module
        archive.add_endpoint("serving_default", fn, specs)
        archive.write_out(tmp_dir, verbose=False)
        content = _convert(tf.lite.TFLiteConverter.from_saved_model(tmp_dir, signature_keys=["serving_default"]),
                           quantize)
    unexpected = set(tflite_custom_ops(content)) - TFTEXT_TFLITE_OPS
    if unexpected:
        raise RuntimeError(f"the TFLite model needs ops no TFLite runtime has: {sorted(unexpected)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)
    return path


def _convert(converter, quantize):
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.allow_custom_ops = True  # FastBertNormalize, FastWordpieceTokenizeWithOffsets (tensorflow-text)
    if quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights, float activations
    return converter.convert()


TFTEXT_TFLITE_OPS = {"FastBertNormalize", "FastWordpieceTokenizeWithOffsets"}


def tflite_custom_ops(content: bytes) -> list[str]:
    """Names of the custom (non-builtin) ops a TFLite flatbuffer uses."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(content, 0)
    return [model.OperatorCodes(i).CustomCode().decode() for i in range(model.OperatorCodesLength())
            if model.OperatorCodes(i).CustomCode()]


def tflite_interpreter(model_path, num_threads: int | None = None):
    """A TFLite interpreter with tensorflow-text's ops registered."""
    import tensorflow_text as tf_text
    from tensorflow.lite.python.interpreter import InterpreterWithCustomOps

    return InterpreterWithCustomOps(model_path=str(model_path), num_threads=num_threads,
                                    custom_op_registerers=tf_text.tflite_registrar.SELECT_TFTEXT_OPS)
