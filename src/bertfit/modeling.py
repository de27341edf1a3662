"""A compact Keras 3 BERT encoder and the classification head.

Names follow the BERT paper. Weights move in and out through one *canonical* dict whose
keys are Google's original TF1 variable names without the `bert/` prefix, with dense
kernels stored [in, out]:

    embeddings/word_embeddings                        [vocab, hidden]
    embeddings/position_embeddings                    [max_positions, hidden]
    embeddings/token_type_embeddings                  [type_vocab, hidden]
    embeddings/LayerNorm/{gamma,beta}                 [hidden]
    encoder/layer_N/attention/self/{query,key,value}/{kernel,bias}
    encoder/layer_N/attention/output/dense/{kernel,bias}
    encoder/layer_N/attention/output/LayerNorm/{gamma,beta}
    encoder/layer_N/intermediate/dense/{kernel,bias}  [hidden, intermediate]
    encoder/layer_N/output/dense/{kernel,bias}        [intermediate, hidden]
    encoder/layer_N/output/LayerNorm/{gamma,beta}
    pooler/dense/{kernel,bias}
    classifier/{kernel,bias}                          [hidden, num_labels] (task head only)

Every checkpoint converter (bertfit.checkpoints) reads its format into this dict.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from .config import EncoderConfig
from .errors import CheckpointError


def canonical_shapes(config: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every encoder tensor's canonical name and shape (the pooler included, no task head)."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {
        "embeddings/word_embeddings": (config.vocab_size, h),
        "embeddings/position_embeddings": (config.max_positions, h),
        "embeddings/token_type_embeddings": (config.type_vocab_size, h),
        "embeddings/LayerNorm/gamma": (h,),
        "embeddings/LayerNorm/beta": (h,),
        "pooler/dense/kernel": (h, h),
        "pooler/dense/bias": (h,),
    }
    for n in range(config.num_layers):
        p = f"encoder/layer_{n}/"
        for proj in ("query", "key", "value"):
            shapes[p + f"attention/self/{proj}/kernel"] = (h, h)
            shapes[p + f"attention/self/{proj}/bias"] = (h,)
        shapes[p + "attention/output/dense/kernel"] = (h, h)
        shapes[p + "attention/output/dense/bias"] = (h,)
        shapes[p + "attention/output/LayerNorm/gamma"] = (h,)
        shapes[p + "attention/output/LayerNorm/beta"] = (h,)
        shapes[p + "intermediate/dense/kernel"] = (h, i)
        shapes[p + "intermediate/dense/bias"] = (i,)
        shapes[p + "output/dense/kernel"] = (i, h)
        shapes[p + "output/dense/bias"] = (h,)
        shapes[p + "output/LayerNorm/gamma"] = (h,)
        shapes[p + "output/LayerNorm/beta"] = (h,)
    return shapes


def check_canonical(weights: dict[str, np.ndarray], config: EncoderConfig, source: str = "checkpoint"):
    """Raise a CheckpointError naming the first missing or mis-shaped tensor."""
    expected = canonical_shapes(config)
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing{more}")
    for name, shape in expected.items():
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, the config needs {shape}")


def gelu(x, act="gelu", training=False):
    if act == "gelu":  # exact, erf-based, as in BERT
        if training and keras.backend.backend() == "tensorflow":
            return _tf_gelu_training(x)
        return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))
    if act == "gelu_new":
        return ops.gelu(x, approximate=True)
    return ops.relu(x)


# Hand-written gradients for TensorFlow training. TF differentiates erf-GELU and LayerNorm op by op,
# and on CPU these element-wise passes cost about as much as a third of the matmuls (each of
# GELU, LayerNorm and softmax: 10-15 % of a MiniLM step at L=128). Inference keeps the plain formulas.


def _tf_gelu_training(x):
    import tensorflow as tf

    @tf.custom_gradient
    def f(x):
        cdf = 0.5 * (1.0 + tf.math.erf(x * (1.0 / math.sqrt(2.0))))

        def grad(dy):  # d/dx x·Φ(x) = Φ(x) + x·φ(x), with Φ kept from the forward pass
            return dy * (cdf + x * tf.exp(-0.5 * tf.square(x)) * (1.0 / math.sqrt(2.0 * math.pi)))

        return x * cdf, grad

    return f(x)


class LayerNorm(keras.layers.LayerNormalization):
    """Keras LayerNormalization over the last axis. On TensorFlow it is written out in nine ops
    (Keras's own builds about twice as many, which showed in the time to trace the inference graph),
    and training uses a hand-written gradient."""

    def call(self, inputs, training=False):
        if keras.backend.backend() != "tensorflow":
            return super().call(inputs)
        import tensorflow as tf

        eps = self.epsilon

        def normalize(x):
            mean = tf.reduce_mean(x, -1, keepdims=True)
            centered = x - mean
            inv = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), -1, keepdims=True) + eps)
            return centered * inv, inv

        @tf.custom_gradient
        def f(x, gamma, beta):
            normed, inv = normalize(x)

            def grad(dy):
                rows = tf.range(tf.rank(dy) - 1)
                g = dy * gamma
                dx = inv * (g - tf.reduce_mean(g, -1, keepdims=True)
                            - normed * tf.reduce_mean(g * normed, -1, keepdims=True))
                return dx, tf.reduce_sum(dy * normed, rows), tf.reduce_sum(dy, rows)

            return normed * gamma + beta, grad

        # In float32 whatever the compute dtype, as Keras does (mixed precision keeps LayerNorm stable).
        x = tf.cast(inputs, tf.float32)
        gamma, beta = tf.convert_to_tensor(self.gamma.value), tf.convert_to_tensor(self.beta.value)
        out = f(x, gamma, beta) if training else normalize(x)[0] * gamma + beta
        return tf.cast(out, self.compute_dtype)


class Dropout(keras.layers.Dropout):
    """Keras dropout with a cheaper mask on TensorFlow.

    tf.nn.dropout draws one float per element and keeps a float mask for the backward pass; on
    CPU that costs about as much as the attention matmuls. Here each element gets 16 random bits
    (two per Philox draw; the rate is rounded to a multiple of 1/65536) and one select applies
    them. `rescale=False` leaves the 1/(1-rate) factor to the caller, so attention can apply it
    to the smaller context tensor. Other backends use Keras's own dropout.
    """

    @property
    def threshold(self) -> int:
        return int(round(self.rate * 65536))

    @property
    def scale(self) -> float:
        """1 / (1 - the effective rate): what kept elements are multiplied by."""
        return 65536.0 / (65536 - self.threshold)

    def call(self, inputs, training=False, rescale=True):
        if not training or self.rate <= 0:
            return inputs
        threshold, scale = self.threshold, self.scale
        if keras.backend.backend() != "tensorflow":
            dropped = keras.random.dropout(inputs, threshold / 65536, seed=self.seed_generator)
            return dropped if rescale else dropped / scale
        import tensorflow as tf

        seed = tf.cast(self.seed_generator.next(), tf.int64)
        n = tf.size(inputs)
        draws = tf.random.stateless_uniform([(n + 1) // 2], seed=seed, minval=None, maxval=None, dtype=tf.int32)
        bits = tf.reshape(tf.bitcast(draws, tf.uint16), [-1])[:n]
        keep = tf.reshape(bits >= threshold, tf.shape(inputs))
        dropped = tf.where(keep, inputs, tf.constant(0, inputs.dtype))
        return dropped * tf.constant(scale, inputs.dtype) if rescale else dropped


class Embeddings(keras.layers.Layer):
    """Word + position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: EncoderConfig, init="truncated_normal", **kwargs):
        super().__init__(**kwargs)
        self.config = config
        init = _initializer(init)
        h = config.hidden_size
        self.word_embeddings = self.add_weight(shape=(config.vocab_size, h), initializer=init, name="word_embeddings")
        self.position_embeddings = self.add_weight(shape=(config.max_positions, h), initializer=init, name="position_embeddings")
        self.token_type_embeddings = self.add_weight(shape=(config.type_vocab_size, h), initializer=init, name="token_type_embeddings")
        self.layer_norm = LayerNorm(epsilon=config.layer_norm_eps, name="LayerNorm")
        with keras.name_scope(self.name):  # variable paths unique per layer (see BertEncoder)
            self.layer_norm.build((None, None, h))
        self.dropout = Dropout(config.hidden_dropout)

    def call(self, token_ids, segment_ids, training=False):
        seq_len = ops.shape(token_ids)[1]
        x = ops.take(self.word_embeddings, token_ids, axis=0)
        x = x + ops.take(self.token_type_embeddings, segment_ids, axis=0)
        x = x + ops.expand_dims(self.position_embeddings[:seq_len], 0)
        return self.dropout(self.layer_norm(x, training=training), training=training)


def _unstack(x, n):
    """x's n parts along axis 0. Not x[0], x[1], ...: each slice's gradient writes a zero-filled
    copy of the whole of x (slicing: 0.88x the training step at L=128, bench/levers.py sliced-qkv);
    unstack's gradient is one stack."""
    return ops.unstack(x, n, axis=0)


class TransformerLayer(keras.layers.Layer):
    """Post-LayerNorm transformer block: self-attention, then the feed-forward network."""

    def __init__(self, config: EncoderConfig, init="truncated_normal", **kwargs):
        super().__init__(**kwargs)
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.head_size = h // config.num_heads
        self.act = config.hidden_act
        init = _initializer(init)
        # Query, key and value in one matmul: one [h, 3h] GEMM instead of three [h, h].
        self.qkv = keras.layers.Dense(3 * h, kernel_initializer=init, name="qkv")
        self.attention_output = keras.layers.Dense(h, kernel_initializer=init, name="attention_output")
        self.attention_norm = LayerNorm(epsilon=config.layer_norm_eps, name="attention_norm")
        self.intermediate = keras.layers.Dense(config.intermediate_size, kernel_initializer=init, name="intermediate")
        self.output_dense = keras.layers.Dense(h, kernel_initializer=init, name="output")
        self.output_norm = LayerNorm(epsilon=config.layer_norm_eps, name="output_norm")
        self.attention_dropout = Dropout(config.attention_dropout)
        self.hidden_dropout = Dropout(config.hidden_dropout)
        with keras.name_scope(self.name):  # variable paths unique per layer (see BertEncoder)
            for layer, n_in in ((self.qkv, h), (self.attention_output, h), (self.attention_norm, h),
                                (self.intermediate, h), (self.output_dense, config.intermediate_size),
                                (self.output_norm, h)):
                layer.build((None, n_in))  # called on [tokens, n_in] rows

    def call(self, x, attention_bias, training=False, first_only=False):
        """x: the batch's tokens as rows, [batch * seq, h]; attention_bias: [batch, 1, 1, seq].

        Rows rather than [batch, seq, h], so that each dense layer is one 2-D matmul: on a 3-D input
        Keras's Dense becomes tf.tensordot, a dozen shape ops per matmul, which were most of the
        inference graph's ops and of the time TensorFlow takes to build and optimize it on a first call.
        first_only: return only position 0 ([CLS]) of each example, attending to every position, as
        [batch, h]: what a [CLS]-pooled classifier needs from its last layer (TF Model Garden's
        `output_range=1`)."""
        seq = ops.shape(attention_bias)[3]  # the batch size stays implicit (-1): fewer ops to build
        h = self.num_heads * self.head_size
        if first_only:
            kernel, bias = self.qkv.kernel, self.qkv.bias
            kv = ops.matmul(x, kernel[:, h:]) + bias[h:]
            x = ops.reshape(x, (-1, seq, h))[:, 0]
            q = ops.matmul(x, kernel[:, :h]) + bias[:h]
            q = ops.reshape(q, (-1, self.num_heads, 1, self.head_size))  # one position: no transpose needed
            kv = ops.transpose(ops.reshape(kv, (-1, seq, 2, self.num_heads, self.head_size)), (2, 0, 3, 1, 4))
            k, v = _unstack(kv, 2)
        else:
            qkv = ops.reshape(self.qkv(x), (-1, seq, 3, self.num_heads, self.head_size))
            qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # [3, batch, heads, seq, head_size]
            q, k, v = _unstack(qkv, 3)
        q = q * (1.0 / math.sqrt(self.head_size))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))  # [batch, heads, seq, seq]
        # Softmax in float32 so that mixed precision neither overflows nor loses the mask.
        # (Keras autocasts float inputs to the layer's compute dtype, so the bias is cast back too.)
        probs = ops.softmax(ops.cast(scores, "float32") + ops.cast(attention_bias, "float32"), axis=-1)
        probs = self.attention_dropout(ops.cast(probs, x.dtype), training=training, rescale=False)
        context = ops.matmul(probs, v)
        if training and self.attention_dropout.rate > 0:  # dropout's rescaling, on the 8x smaller tensor
            context = context * self.attention_dropout.scale
        context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (-1, h))
        attention = self.hidden_dropout(self.attention_output(context), training=training)
        x = self.attention_norm(x + attention, training=training)
        ffn = self.output_dense(gelu(self.intermediate(x), self.act, training))
        return self.output_norm(x + self.hidden_dropout(ffn, training=training), training=training)


class BertEncoder(keras.Model):
    """BERT: token_ids, segment_ids, padding_mask [batch, seq] -> sequence_output, pooled_output.

    Any sequence length up to max_positions; nothing is padded inside the model.
    """

    def __init__(self, config: EncoderConfig, init="truncated_normal", **kwargs):
        super().__init__(**kwargs)
        self.config = config
        # The weights are made here, outside any call, so without these scopes every layer's variables
        # would have the same paths ("qkv/kernel"), and the optimizer's per-variable settings (layer-wise
        # lr decay) are looked up by path: "bert/layer_0/qkv/kernel".
        with keras.name_scope(self.name):
            self.embeddings = Embeddings(config, init, name="embeddings")
            self.encoder_layers = [TransformerLayer(config, init, name=f"layer_{n}") for n in range(config.num_layers)]
            self.pooler = keras.layers.Dense(config.hidden_size, activation="tanh",
                                             kernel_initializer=_initializer(init), name="pooler")
            self.pooler.build((None, config.hidden_size))

    def call(self, inputs, training=False, first_only=False):
        """first_only=True: the last layer computes position 0 alone, so sequence_output is [batch, 1, h]
        and pooled_output is unchanged (for MiniLM-L6 at length 128, 14 % fewer matmul FLOPs)."""
        token_ids = inputs["token_ids"]
        x, attention_bias = self.embed(inputs, training)
        h = self.config.hidden_size
        last = len(self.encoder_layers) - 1
        for n, layer in enumerate(self.encoder_layers):
            x = layer(x, attention_bias, training=training, first_only=first_only and n == last)
        x = ops.reshape(x, (-1, 1 if first_only and last >= 0 else ops.shape(token_ids)[1], h))
        pooled = self.pooler(x[:, 0])
        return {"sequence_output": x, "pooled_output": pooled}

    def embed(self, inputs, training=False):
        """The embeddings as rows [batch * seq, h] (see TransformerLayer.call) and the additive
        attention mask [batch, 1, 1, seq]: padded keys get -1e9 before the softmax."""
        mask = ops.cast(inputs["padding_mask"], "float32")
        attention_bias = ops.expand_dims(ops.expand_dims((1.0 - mask) * -1e9, 1), 1)
        x = self.embeddings(inputs["token_ids"], inputs["segment_ids"], training=training)
        return ops.reshape(x, (-1, self.config.hidden_size)), attention_bias

    # -- canonical weights -------------------------------------------------------------

    def _variables_by_name(self):
        """Canonical name -> (variable, transform from canonical array to the variable's value)."""
        e = self.embeddings
        out = {
            "embeddings/word_embeddings": e.word_embeddings,
            "embeddings/position_embeddings": e.position_embeddings,
            "embeddings/token_type_embeddings": e.token_type_embeddings,
            "embeddings/LayerNorm/gamma": e.layer_norm.gamma,
            "embeddings/LayerNorm/beta": e.layer_norm.beta,
            "pooler/dense/kernel": self.pooler.kernel,
            "pooler/dense/bias": self.pooler.bias,
        }
        for n, layer in enumerate(self.encoder_layers):
            p = f"encoder/layer_{n}/"
            out.update({
                p + "attention/output/dense/kernel": layer.attention_output.kernel,
                p + "attention/output/dense/bias": layer.attention_output.bias,
                p + "attention/output/LayerNorm/gamma": layer.attention_norm.gamma,
                p + "attention/output/LayerNorm/beta": layer.attention_norm.beta,
                p + "intermediate/dense/kernel": layer.intermediate.kernel,
                p + "intermediate/dense/bias": layer.intermediate.bias,
                p + "output/dense/kernel": layer.output_dense.kernel,
                p + "output/dense/bias": layer.output_dense.bias,
                p + "output/LayerNorm/gamma": layer.output_norm.gamma,
                p + "output/LayerNorm/beta": layer.output_norm.beta,
            })
        return out

    def set_canonical_weights(self, weights: dict[str, np.ndarray], source: str = "checkpoint"):
        """Load a canonical dict (see the module docstring); clear errors name the tensor."""
        check_canonical(weights, self.config, source)
        for name, var in self._variables_by_name().items():
            var.assign(np.asarray(weights[name], dtype="float32"))
        for n, layer in enumerate(self.encoder_layers):
            p = f"encoder/layer_{n}/attention/self/"
            layer.qkv.kernel.assign(np.concatenate([weights[p + f"{t}/kernel"] for t in ("query", "key", "value")], axis=1))
            layer.qkv.bias.assign(np.concatenate([weights[p + f"{t}/bias"] for t in ("query", "key", "value")]))

    def get_canonical_weights(self) -> dict[str, np.ndarray]:
        out = {name: np.asarray(ops.convert_to_numpy(var)) for name, var in self._variables_by_name().items()}
        h = self.config.hidden_size
        for n, layer in enumerate(self.encoder_layers):
            p = f"encoder/layer_{n}/attention/self/"
            kernel, bias = ops.convert_to_numpy(layer.qkv.kernel), ops.convert_to_numpy(layer.qkv.bias)
            for j, t in enumerate(("query", "key", "value")):
                out[p + f"{t}/kernel"] = kernel[:, j * h:(j + 1) * h]
                out[p + f"{t}/bias"] = bias[j * h:(j + 1) * h]
        return out


def dummy_inputs(batch: int = 2, seq: int = 8) -> dict[str, np.ndarray]:
    """A small valid batch, to build a model's variables."""
    return {
        "token_ids": np.ones((batch, seq), "int32"),
        "segment_ids": np.zeros((batch, seq), "int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def _initializer(name: str):
    """BERT's N(0, 0.02) truncated, or zeros where checkpoint weights overwrite the values anyway."""
    return keras.initializers.TruncatedNormal(stddev=0.02) if name == "truncated_normal" else keras.initializers.Zeros()


def build_encoder(config: EncoderConfig, weights: dict[str, np.ndarray] | None = None, source: str = "checkpoint") -> BertEncoder:
    # With weights, skip drawing random values that set_canonical_weights replaces (about 1 s for
    # MiniLM on a 2-core CPU; more for bigger models). set_canonical_weights checks every tensor is given.
    encoder = BertEncoder(config, init="truncated_normal" if weights is None else "zeros", name="bert")
    encoder(dummy_inputs())
    if weights is not None:
        encoder.set_canonical_weights(weights, source)
    return encoder


class BertClassifier(keras.Model):
    """Encoder + dropout + dense head; returns logits [batch, labels].

    pooling="cls" feeds BERT's pooler output ([CLS] through dense+tanh) to the head, as BERT does;
    "mean" feeds the mean of the non-padding token vectors, the sentence vector that
    sentence-transformers checkpoints (the default MiniLM among them) were trained to produce.
    Single-label tasks (binary included: 2 classes) use softmax over the logits; multi-label
    tasks use a sigmoid per label.
    """

    def __init__(self, encoder: BertEncoder, num_labels: int, dropout: float | None = None, pooling: str = "cls",
                 **kwargs):
        super().__init__(**kwargs)
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be cls or mean, not {pooling!r}")
        self.encoder = encoder
        self.num_labels = num_labels
        self.pooling = pooling
        if pooling == "mean":
            encoder.pooler.trainable = False  # unused: kept as loaded, and no "missing gradients" warnings
        rate = encoder.config.hidden_dropout if dropout is None else dropout
        self.dropout = Dropout(rate)
        self.classifier = keras.layers.Dense(
            num_labels, kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02), name="classifier")
        self.classifier.build((None, encoder.config.hidden_size))

    def call(self, inputs, training=False):
        # [CLS] pooling reads nothing else from the last layer, so it computes nothing else there.
        outputs = self.encoder(inputs, training=training, first_only=self.pooling == "cls")
        if self.pooling == "cls":
            pooled = outputs["pooled_output"]
        else:
            x = outputs["sequence_output"]
            mask = ops.expand_dims(ops.cast(inputs["padding_mask"], x.dtype), -1)
            pooled = ops.sum(x * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)
        return self.classifier(self.dropout(pooled, training=training))

    def set_head_weights(self, kernel: np.ndarray, bias: np.ndarray):
        want = (self.encoder.config.hidden_size, self.num_labels)
        if tuple(kernel.shape) != want or tuple(bias.shape) != (self.num_labels,):
            raise CheckpointError(f"classifier/kernel has shape {tuple(kernel.shape)}, the task needs {want}")
        self.classifier.kernel.assign(kernel)
        self.classifier.bias.assign(bias)
