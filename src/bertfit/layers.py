"""Keras layers for the model of the TensorFlow tutorials: raw strings -> Preprocessor -> Encoder.

    text = keras.Input(shape=(), dtype="string")
    x = bertfit.layers.Encoder("minilm-l6")(bertfit.layers.Preprocessor("minilm-l6")(text))["pooled_output"]
    model = keras.Model(text, keras.layers.Dense(2)(keras.layers.Dropout(0.1)(x)))

The keys are TF Hub's: the preprocessor returns `token_ids`, `segment_ids`, `padding_mask` (int32,
[batch, seq], padded to the batch's longest row), the encoder `pooled_output` ([batch, hidden]) and
`sequence_output` ([batch, seq, hidden]). Both layers take any checkpoint bertfit loads ("minilm-l6",
a Hugging Face folder, a TF1 checkpoint, a TF Hub SavedModel, a run folder) and save with the model:
`model.save("x.keras")` keeps the vocabulary and the weights, so `keras.models.load_model` needs
neither the checkpoint nor its package, only `import bertfit.layers` first (it registers the classes
with Keras; a plain `import bertfit` stays light and does not import TensorFlow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import keras
import tensorflow as tf

from .checkpoints import DEFAULT_MODEL, read_checkpoint
from .config import EncoderConfig
from .errors import ConfigError
from .modeling import BertEncoder, dummy_inputs
from .tokenization import BertTokenizer, _check_options, guess_lower_case
from .training import AdamW, WarmupLinearDecay  # noqa: F401  (registered, so load_model finds the optimizer)


@keras.saving.register_keras_serializable(package="bertfit")
class Preprocessor(keras.layers.Layer):
    """BERT's tokenizer and packer as a layer: a tf.string batch, or a pair [texts, second texts], in;
    `{"token_ids", "segment_ids", "padding_mask"}` out. No variables; runs inside the graph of
    `model.fit`, `model.predict` and an exported SavedModel. `truncation` and `head_tokens` as in
    `BertTokenizer.pack` (longest_first, only_second, head, tail, head+tail)."""

    def __init__(self, model=DEFAULT_MODEL, max_length=128, truncation="longest_first", head_tokens=None,
                 lower_case=None, **kwargs):
        self._deferred = kwargs.pop("_deferred", False)
        super().__init__(**kwargs)
        _check_options(max_length, truncation, head_tokens, pair=False)
        self.model, self.max_length, self.truncation, self.head_tokens = str(model), max_length, truncation, head_tokens
        # Strings in: nothing for Keras to convert or autocast; texts may be a Python list when called eagerly.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.tokenizer = None
        self.lower_case = lower_case
        if not self._deferred:  # from_config waits for load_assets (the saved vocabulary)
            ckpt = read_checkpoint(self.model)
            self._set_vocabulary(ckpt.vocab, lower_case if lower_case is not None else ckpt.lower_case)

    def _set_vocabulary(self, vocab, lower_case):
        if lower_case is None:
            lower_case = guess_lower_case(vocab)
        self.lower_case = bool(lower_case)
        self.tokenizer = BertTokenizer(vocab, lower_case=self.lower_case)

    def call(self, inputs):
        if self.tokenizer is None:
            raise ConfigError(f"Preprocessor {self.name!r} has no vocabulary yet: it was made by from_config "
                              "without load_assets (load the whole model with keras.models.load_model)")
        texts, pairs = _texts_and_pairs(inputs)
        return self.tokenizer(texts, pairs, max_length=self.max_length, truncation=self.truncation,
                              head_tokens=self.head_tokens)

    def compute_output_spec(self, inputs):
        texts, _ = _texts_and_pairs(inputs, symbolic=True)
        batch = texts.shape[0] if texts.shape else None
        return {key: keras.KerasTensor((batch, None), dtype="int32")
                for key in ("token_ids", "segment_ids", "padding_mask")}

    def get_config(self):
        return {**super().get_config(), "model": self.model, "max_length": self.max_length,
                "truncation": self.truncation, "head_tokens": self.head_tokens, "lower_case": self.lower_case}

    @classmethod
    def from_config(cls, config):
        return cls(**config, _deferred=True)

    def save_assets(self, directory):
        self.tokenizer.save_vocab(directory)

    def load_assets(self, directory):
        self._set_vocabulary(Path(directory) / "vocab.txt", self.lower_case)


def _texts_and_pairs(inputs, symbolic=False):
    """(texts, second texts or None) from a batch of strings or a list/tuple of one or two batches.
    A Python list of str is one batch of texts, not a pair."""
    if isinstance(inputs, dict):
        raise ConfigError("Preprocessor takes a batch of strings or [texts, second texts], not a dict")
    if isinstance(inputs, (list, tuple)) and inputs and not isinstance(inputs[0], (str, bytes)):
        if len(inputs) not in (1, 2):
            raise ConfigError(f"Preprocessor takes one or two batches of strings (a pair), got {len(inputs)}")
        texts, pairs = inputs[0], (inputs[1] if len(inputs) == 2 else None)
    else:
        texts, pairs = inputs, None
    for name, x in (("texts", texts), ("second texts", pairs)):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and str(getattr(dtype, "name", dtype)) != "string":
            raise ConfigError(f"Preprocessor: {name} must be strings (dtype string), got {dtype}")
    if not symbolic:
        texts = tf.reshape(texts, [-1]) if isinstance(texts, tf.Tensor) else texts
        pairs = tf.reshape(pairs, [-1]) if isinstance(pairs, tf.Tensor) else pairs
    return texts, pairs


@keras.saving.register_keras_serializable(package="bertfit")
class Encoder(BertEncoder):
    """The BERT encoder as a layer, with the weights of a checkpoint: the preprocessor's dict in,
    `{"pooled_output", "sequence_output"}` out.

    `pooled_output` is BERT's pooler on `[CLS]`. Its last layer is computed for position 0 alone, and
    `sequence_output`'s separately, so a model that reads only `pooled_output` never computes the
    rest of the last layer (TensorFlow prunes what no output needs): 1.16x the training steps with
    MiniLM at length 128 (bench/levers.py). In training the two see their own dropout masks there.
    `config` (an EncoderConfig or its dict) builds a randomly initialised encoder instead."""

    def __init__(self, model=DEFAULT_MODEL, trainable=True, config=None, **kwargs):
        init = kwargs.pop("_init", None)
        weights = None
        if config is None:
            ckpt = read_checkpoint(model)
            config, weights = ckpt.config, ckpt.weights
        elif isinstance(config, dict):
            config = EncoderConfig(**config)
        kwargs.setdefault("name", "encoder")
        super().__init__(config, init=init or ("zeros" if weights is not None else "truncated_normal"),
                         trainable=trainable, **kwargs)
        self.model = str(model)
        self(dummy_inputs())
        if weights is not None:
            self.set_canonical_weights(weights, source=str(model))

    def call(self, inputs, training=False):
        x, attention_bias = self.embed(inputs, training)
        *lower, last = self.encoder_layers
        for layer in lower:
            x = layer(x, attention_bias, training=training)
        h = self.config.hidden_size
        sequence = keras.ops.reshape(last(x, attention_bias, training=training),
                                     (-1, keras.ops.shape(inputs["token_ids"])[1], h))
        first = last(x, attention_bias, training=training, first_only=True)
        return {"pooled_output": self.pooler(first), "sequence_output": sequence}

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "dtype": keras.saving.serialize_keras_object(self.dtype_policy),
                "model": self.model, "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.saving.deserialize_keras_object(config["dtype"])
        return cls(**config, _init="zeros")  # the weights come from the saved file


__all__ = ["Preprocessor", "Encoder"]
