"""What each CPU speed lever is worth: bertfit's training step and inference with one thing changed.

    .venv/bin/python bench/levers.py                             # training levers, L=128, B=32
    .venv/bin/python bench/levers.py --seq 32 --repeats 7
    .venv/bin/python bench/levers.py --inference --seq 512 --batches 32,8,2,1
    .venv/bin/python bench/levers.py --settings default,inter-1,onednn-off --seq 128

Training: every variant is MiniLM-L6 (the default model's weights) with bertfit's own training step
(`FineTuner.train_step`, as `fit` runs it: forward, backward, clipping, AdamW, dropout 0.1), built in one process and
timed in turn, round-robin, so that noise from other work on the machine hits each alike; the table
gives the median tok/s, the ratio to the first variant and the spread of the rounds
((max - min) / median). Variants:

  bertfit         as shipped
  keras-adamw     Keras's own AdamW (clipping, weight decay and Adam as separate whole-tensor
                  operations, the embedding gradient made dense) instead of bertfit's fused update
  autodiff-norm   TF's autodiff of LayerNorm and erf-GELU instead of the hand-written gradients
  no-dropout      dropout 0 (what dropout costs; not a recipe change we make)
  xla             the forward and backward pass XLA-compiled (`--jit`); one fixed shape, so no retracing cost here
  frozen-words    the 30522 x 384 word-embedding table not trained: the most that a sparse (lazy)
                  embedding update could save. The dense update (as in PyTorch's AdamW) turns the
                  gathered rows' gradient into a full table and runs clipping, weight decay and Adam
                  over all 11.7 M entries each step; a lazy update would touch only the batch's rows,
                  but it is different math (rows not in the batch keep their momentum unapplied).
  full-last-layer the last transformer layer computed at every position, as Hugging Face's
                  classifiers do, instead of at [CLS] alone (all that [CLS] pooling reads from it)
  sliced-qkv      query, key and value taken from the fused projection by slicing (qkv[0], qkv[1],
                  qkv[2]) instead of unstack: each slice's gradient is a zero-filled full-size copy
  rank3           the layout before 2026-11-24 (session 12): hidden states kept as [batch, seq, h],
                  so each Keras Dense runs through tf.tensordot (a dozen shape ops around each
                  matmul), and inference uses Keras's LayerNormalization (twice the ops of bertfit's);
                  bertfit now keeps the tokens as rows, [batch * seq, h], and each Dense is one matmul

Process settings (`--settings`): what can only be set before TensorFlow starts, one worker process
per setting (bench/step.py's bertfit worker), asked in turn for a training step and an inference
batch of 32 at `--seq`:

  default         as bertfit runs: TensorFlow's thread pools, its pooled (BFC) CPU allocator, oneDNN on
  inter-1         one inter-op thread (ops run one at a time, each using every core)
  onednn-off      TF_ENABLE_ONEDNN_OPTS=0: Eigen kernels instead of oneDNN's (on an AVX2-only CPU,
                  also what TensorFlow does when the variable is unset)
  xla-auto        TensorFlow's XLA auto-clustering on the CPU: XLA compiles the clusters of ops it
                  supports inside each graph (element-wise chains fused), the rest runs as usual
  malloc          TF_CPU_ALLOCATOR_USE_BFC=false: TensorFlow's default CPU allocator, which hands each
                  large freed tensor back to the OS (page faults on the next allocation)

First call (`--first-call`): what `bertfit predict` pays once per process before its first batch runs
at full speed: building (tracing) `Classifier.forward_fn`'s graph, TensorFlow optimizing it, and the
first batch. Each repeat is a fresh process per variant (bertfit, rank3), in turn; it loads MiniLM-L6,
then times the first call on a batch of 32 rows at `--seq` and then the same call again; the table
gives the medians of the trace, the first call and the second, and first - second (the one-off cost).

Inference (`--inference`): `Classifier.forward_fn` (what predict and evaluate run) over the same
`--rows` rows (64) cut into batches of each size in `--batches`: ex/s per batch size, ratio to the first.
With `--full-last-layer`: the same forward pass with the last layer computed at every position
against it, at the first batch size. With `--chunked-attention`: the same forward pass with each
layer's attention (scores, softmax, context) computed a few rows at a time in a `tf.while_loop`, as
many rows as keep the scores within 16 MB (1 row at L=512, 21 at 128), the dense layers still over the
whole batch (a lever for long rows in fixed batches; bertfit's predict instead splits such batches).
With `--xla`: the same forward pass XLA-compiled
(`jit_compile=True`) against it, at the first batch size, and the first call's time (XLA compiles once per input shape, so variable lengths would need
fixed length buckets, each paying that compile once).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from step import _read  # a worker's next answer line (exits if the worker died)
from step import batch_arrays as rows  # the same synthetic rows as bench/step.py

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TRAIN_VARIANTS = ("bertfit", "keras-adamw", "autodiff-norm", "no-dropout", "xla", "frozen-words", "full-last-layer",
                  "sliced-qkv", "rank3")
SETTINGS = {  # name: (environment, (intra-op threads, inter-op threads) or None for TF's choice)
    "default": ({}, None),
    "inter-1": ({}, (0, 1)),
    "onednn-off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, None),
    "xla-auto": ({"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"}, None),
    "malloc": ({"TF_CPU_ALLOCATOR_USE_BFC": "false"}, None),
}


def build_step(variant, batch):
    """A compiled training step for one variant, traced once (patches apply only while tracing)."""
    import bertfit  # before TensorFlow: it sets TF's CPU options (see bertfit/__init__.py)
    import keras
    import tensorflow as tf

    from bertfit import modeling, training
    from bertfit.classifier import Classifier
    from bertfit.config import TrainConfig
    from bertfit.modeling import BertClassifier, dummy_inputs

    config = TrainConfig(dropout=0.0 if variant == "no-dropout" else 0.1, jit=variant == "xla")
    pre = bertfit.load_pretrained("minilm-l6")
    for layer in pre.encoder._flatten_layers():
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = config.dropout
    cls = full_last_layer_classifier() if variant == "full-last-layer" else BertClassifier
    model = cls(pre.encoder, 2, dropout=config.dropout)
    model(dummy_inputs())
    if variant == "frozen-words":
        pre.encoder.embeddings.word_embeddings.trainable = False
    clf = Classifier(model, pre.tokenizer, ["0", "1"], train_config=config)
    tuner = training.FineTuner(clf, config, batches_per_epoch=10_000)

    patches = []
    if variant == "keras-adamw":
        patches.append((training.AdamW, "_backend_apply_gradients", keras.optimizers.AdamW._backend_apply_gradients))
    if variant == "sliced-qkv":
        patches.append((modeling, "_unstack", lambda x, n: [x[i] for i in range(n)]))
    if variant == "rank3":
        patches += rank3_patches()
    if variant == "autodiff-norm":
        patches.append((modeling, "_tf_gelu_training", lambda x: 0.5 * x * (1.0 + tf.math.erf(x / 2 ** 0.5))))
        patches.append((modeling.LayerNorm, "call", lambda self, inputs, training=False:
                        keras.layers.LayerNormalization.call(self, inputs)))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    ids, seg, mask, labels = batch
    try:
        inputs, weights = {"token_ids": ids, "segment_ids": seg, "padding_mask": mask}, np.full(len(labels), 1 / len(labels), "float32")
        step = lambda: tuner.train_on_batch(inputs, labels, weights)  # noqa: E731
        step()  # traces with the patches in place
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    step()
    return step


def full_last_layer_classifier():
    from bertfit.modeling import BertClassifier

    class FullLastLayer(BertClassifier):
        """[CLS] pooling with the last layer computed at every position (bertfit before 2026-11-24)."""

        def call(self, inputs, training=False):
            pooled = self.encoder(inputs, training=training)["pooled_output"]
            return self.classifier(self.dropout(pooled, training=training))

    return FullLastLayer


def rank3_patches():
    """(owner, name, value) patches that restore the [batch, seq, h] layout (bertfit before session 12)."""
    import math

    import keras
    from keras import ops

    from bertfit import modeling

    def layer_call(self, x, attention_bias, training=False, first_only=False):
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        h = self.num_heads * self.head_size
        if first_only:
            kernel, bias = self.qkv.kernel, self.qkv.bias
            q = ops.matmul(x[:, :1], kernel[:, :h]) + bias[:h]
            kv = ops.matmul(x, kernel[:, h:]) + bias[h:]
            q = ops.reshape(q, (batch, self.num_heads, 1, self.head_size))
            kv = ops.transpose(ops.reshape(kv, (batch, seq, 2, self.num_heads, self.head_size)), (2, 0, 3, 1, 4))
            k, v = modeling._unstack(kv, 2)
            x, seq = x[:, :1], 1
        else:
            qkv = ops.transpose(ops.reshape(self.qkv(x), (batch, seq, 3, self.num_heads, self.head_size)),
                                (2, 0, 3, 1, 4))
            q, k, v = modeling._unstack(qkv, 3)
        q = q * (1.0 / math.sqrt(self.head_size))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        probs = ops.softmax(ops.cast(scores, "float32") + ops.cast(attention_bias, "float32"), axis=-1)
        probs = self.attention_dropout(ops.cast(probs, x.dtype), training=training, rescale=False)
        context = ops.matmul(probs, v)
        if training and self.attention_dropout.rate > 0:
            context = context * self.attention_dropout.scale
        context = ops.reshape(ops.transpose(context, (0, 2, 1, 3)), (batch, seq, h))
        attention = self.hidden_dropout(self.attention_output(context), training=training)
        x = self.attention_norm(x + attention, training=training)
        ffn = self.output_dense(modeling.gelu(self.intermediate(x), self.act, training))
        return self.output_norm(x + self.hidden_dropout(ffn, training=training), training=training)

    def encoder_call(self, inputs, training=False, first_only=False):
        mask = ops.cast(inputs["padding_mask"], "float32")
        attention_bias = ops.expand_dims(ops.expand_dims((1.0 - mask) * -1e9, 1), 1)
        x = self.embeddings(inputs["token_ids"], inputs["segment_ids"], training=training)
        last = len(self.encoder_layers) - 1
        for n, layer in enumerate(self.encoder_layers):
            x = layer(x, attention_bias, training=training, first_only=first_only and n == last)
        return {"sequence_output": x, "pooled_output": self.pooler(x[:, 0])}

    shipped_norm = modeling.LayerNorm.call

    def norm_call(self, inputs, training=False):  # Keras's LayerNormalization at inference
        if training:
            return shipped_norm(self, inputs, training=True)
        return keras.layers.LayerNormalization.call(self, inputs)

    return [(modeling.TransformerLayer, "call", layer_call), (modeling.BertEncoder, "call", encoder_call),
            (modeling.LayerNorm, "call", norm_call)]


def first_call_worker(variant, seq):
    """One fresh process: load MiniLM-L6, time forward_fn's trace, its first call and a second call."""
    import bertfit
    import tensorflow as tf

    if variant == "rank3":
        for owner, name, value in rank3_patches():
            setattr(owner, name, value)
    from bertfit.classifier import Classifier
    from bertfit.config import TrainConfig
    from bertfit.modeling import BertClassifier, dummy_inputs

    pre = bertfit.load_pretrained("minilm-l6")
    model = BertClassifier(pre.encoder, 2)
    model(dummy_inputs())
    forward = Classifier(model, pre.tokenizer, ["0", "1"], train_config=TrainConfig()).forward_fn()
    ids, seg, mask, _ = rows(32, seq)
    spec = tf.TensorSpec([None, None], tf.int32)
    times = [time.perf_counter()]
    forward.get_concrete_function(spec, spec, spec)
    times.append(time.perf_counter())
    for _ in range(2):
        forward(ids, seg, mask).numpy()
        times.append(time.perf_counter())
    trace, first, second = np.diff(times)
    print(json.dumps({"trace": trace, "first": first, "second": second,
                      "ops": len(forward.get_concrete_function(spec, spec, spec).graph.get_operations())}))


def run_first_call(seq, repeats):
    names = ("bertfit", "rank3")
    results = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            out = subprocess.run([sys.executable, __file__, "--first-call-worker", n, "--seq", str(seq)],
                                 stdout=subprocess.PIPE, text=True, check=True, cwd=Path(__file__).parent.parent)
            results[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nfirst call of the inference function, MiniLM-L6, 32 rows at L={seq}, "
          f"median of {repeats} fresh processes each (seconds)")
    print(f"{'variant':<10}{'graph ops':>10}{'trace':>8}{'first':>8}{'second':>8}{'first-second':>14}{'trace+one-off':>15}")
    for n in names:
        med = {k: np.median([r[k] for r in results[n]]) for k in ("trace", "first", "second")}
        extra = np.median([r["first"] - r["second"] for r in results[n]])  # the first call's one-off part
        print(f"{n:<10}{results[n][0]['ops']:>10}{med['trace']:>8.3f}{med['first']:>8.3f}{med['second']:>8.3f}"
              f"{extra:>14.3f}{med['trace'] + extra:>15.3f}")


def chunked_attention_patches():
    """(owner, name, value) patches: at inference, attention runs over groups of rows whose scores fit
    in 16 MB, one group after another (see --chunked-attention)."""
    import math

    import tensorflow as tf
    from keras import ops

    from bertfit import modeling

    shipped = modeling.TransformerLayer.call

    def layer_call(self, x, attention_bias, training=False, first_only=False):
        assert not training, "the chunked variant is for inference"
        if first_only:  # the [CLS]-only last layer's scores are [batch, heads, 1, seq]: nothing to chunk
            return shipped(self, x, attention_bias, first_only=True)
        seq = ops.shape(attention_bias)[3]
        h = self.num_heads * self.head_size
        qkv = ops.transpose(ops.reshape(self.qkv(x), (-1, seq, 3, self.num_heads, self.head_size)), (2, 0, 3, 1, 4))
        q, k, v = modeling._unstack(qkv, 3)
        q = q * (1.0 / math.sqrt(self.head_size))
        rows = tf.maximum(1, (16 << 20) // (4 * self.num_heads * seq * seq))
        chunks = (tf.shape(q)[0] + rows - 1) // rows

        def body(i, out):
            part = slice(i * rows, (i + 1) * rows)
            probs = tf.nn.softmax(tf.matmul(q[part], k[part], transpose_b=True) + attention_bias[part])
            return i + 1, out.write(i, tf.matmul(probs, v[part]))

        _, out = tf.while_loop(lambda i, _: i < chunks, body, (0, tf.TensorArray(q.dtype, size=chunks)),
                               parallel_iterations=1)
        context = ops.reshape(ops.transpose(out.concat(), (0, 2, 1, 3)), (-1, h))
        x = self.attention_norm(x + self.attention_output(context))
        return self.output_norm(x + self.output_dense(modeling.gelu(self.intermediate(x), self.act, False)))

    return [(modeling.TransformerLayer, "call", layer_call)]


def build_forward(xla=False, full_last_layer=False):
    import bertfit
    from bertfit.classifier import Classifier
    from bertfit.config import TrainConfig
    from bertfit.modeling import BertClassifier, dummy_inputs

    import keras

    pre = bertfit.load_pretrained("minilm-l6")
    keras.utils.set_random_seed(0)  # the same random head in every variant, so their outputs compare
    model = (full_last_layer_classifier() if full_last_layer else BertClassifier)(pre.encoder, 2)
    model(dummy_inputs())
    return Classifier(model, pre.tokenizer, ["0", "1"], train_config=TrainConfig()).forward_fn(jit=xla)


def settings_worker(name):
    """A bench/step.py bertfit worker under one process setting (the environment is set by the driver)."""
    import bertfit  # noqa: F401  (before TensorFlow: it sets TF's CPU options, unless a setting did)
    import tensorflow as tf

    import step

    threads = SETTINGS[name][1]
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(threads[1])
    step.worker_main("bertfit")


def run_settings(names, seq, batch, repeats):
    """Round-robin over one worker process per setting: median training tok/s and inference ex/s."""
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    procs = {}
    for name in names:
        env = {**os.environ, **SETTINGS[name][0]}
        procs[name] = subprocess.Popen([sys.executable, __file__, "--setting-worker", name], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent.parent)
        _read(procs[name])  # its "ready" line

    def ask(name, **cmd):
        procs[name].stdin.write(json.dumps(cmd) + "\n")
        procs[name].stdin.flush()
        return json.loads(_read(procs[name]))

    rates = {(n, op): [] for n in names for op in ("train", "infer")}
    for r in range(repeats):
        for op in ("train", "infer"):
            for n in names:
                seconds = ask(n, op=op, seq=seq, batch=batch, steps=2, warmup=2 if r == 0 else 0)["seconds"]
                rates[n, op].append(batch * (seq if op == "train" else 1) / seconds)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(timeout=60)
    print(f"\nprocess settings, MiniLM-L6, L={seq}, B={batch}, median of {repeats} rounds of 2 steps")
    print(f"{'setting':<14}{'train tok/s':>12}{'ratio':>7}{'spread':>8}{'infer ex/s':>12}{'ratio':>7}{'spread':>8}")
    base = {op: np.median(rates[names[0], op]) for op in ("train", "infer")}
    for n in names:
        cells = "".join(f"{np.median(rates[n, op]):>{w}.1f}{np.median(rates[n, op]) / base[op]:>7.2f}"
                        f"{spread(rates[n, op]):>8}" for op, w in (("train", 12), ("infer", 12)))
        print(f"{n:<14}{cells}")


def spread(values):
    """(max - min) / median, as a percentage: how far apart the rounds were."""
    return f"{(max(values) - min(values)) / np.median(values):.0%}"


def time_rate(fn, work, rates):
    t = time.perf_counter()
    fn()
    rates.append(work / (time.perf_counter() - t))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--repeats", type=int, default=5, help="rounds; the table shows medians")
    p.add_argument("--variants", default=",".join(TRAIN_VARIANTS))
    p.add_argument("--inference", action="store_true", help="time inference batch sizes instead of training levers")
    p.add_argument("--batches", default="32,8,2,1", help="--inference: batch sizes to compare")
    p.add_argument("--rows", type=int, default=64, help="--inference: rows per round")
    p.add_argument("--xla", action="store_true", help="--inference: plain vs XLA-compiled forward pass")
    p.add_argument("--chunked-attention", action="store_true",
                   help="--inference: plain vs attention computed in 16 MB groups of rows")
    p.add_argument("--full-last-layer", action="store_true",
                   help="--inference: [CLS]-only last layer (plain) vs the last layer at every position")
    p.add_argument("--settings", help=f"compare process settings instead: some of {','.join(SETTINGS)}")
    p.add_argument("--first-call", action="store_true",
                   help="time the inference function's first call (trace, optimize, run), bertfit vs rank3")
    p.add_argument("--setting-worker", help=argparse.SUPPRESS)
    p.add_argument("--first-call-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.setting_worker:
        return settings_worker(args.setting_worker)
    if args.first_call_worker:
        return first_call_worker(args.first_call_worker, args.seq)

    import bertfit  # noqa: F401  (before TensorFlow: it sets TF's CPU options)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one trace per variant is the point, not a retracing problem
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    print(f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, TensorFlow {tf.__version__}")
    if args.settings:
        return run_settings(args.settings.split(","), args.seq, args.batch, args.repeats)
    if args.first_call:
        return run_first_call(args.seq, args.repeats)

    if args.inference:
        sizes = [int(b) for b in args.batches.split(",")]
        ids, seg, mask, _ = rows(args.rows, args.seq)
        n = len(ids)
        plain = build_forward()  # name -> (forward function, batch size):
        patched = {}  # forward name -> patches active while it is traced
        if args.xla or args.full_last_layer or args.chunked_attention:
            forwards = {"plain": (plain, sizes[0])}
            if args.chunked_attention:
                forwards["chunked"] = (build_forward(), sizes[0])
                patched["chunked"] = chunked_attention_patches()
            if args.full_last_layer:
                forwards["full-last"] = (build_forward(full_last_layer=True), sizes[0])
            if args.xla:
                forwards["xla"] = (build_forward(xla=True), sizes[0])
        else:
            forwards = {f"batch {size}": (plain, size) for size in sizes}

        def run_all(name):
            forward, size = forwards[name]
            for i in range(0, n, size):
                forward(ids[i:i + size], seg[i:i + size], mask[i:i + size]).numpy()

        first = {}
        for name in forwards:  # trace (and compile) each shape
            shipped = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patched.get(name, [])]
            for owner, attr, value in patched.get(name, []):
                setattr(owner, attr, value)
            t = time.perf_counter()
            run_all(name)
            first[name] = time.perf_counter() - t
            for owner, attr, value in shipped:
                setattr(owner, attr, value)
        if "chunked" in forwards:  # the same function of the inputs
            a, b = (forwards[n][0](ids[:sizes[0]], seg[:sizes[0]], mask[:sizes[0]]).numpy() for n in ("plain", "chunked"))
            print(f"chunked vs plain, largest difference in the probabilities: {np.abs(a - b).max():.1e}")
        rates = {name: [] for name in forwards}
        for _ in range(args.repeats):
            for name in forwards:
                time_rate(lambda: run_all(name), n, rates[name])
        base = np.median(rates[next(iter(forwards))])
        print(f"\ninference, MiniLM-L6, L={args.seq}, {n} rows, median of {args.repeats} rounds")
        print(f"{'forward':<10}{'ex/s':>10}{'ratio':>8}{'spread':>8}{'first round s':>15}")
        for name in forwards:
            print(f"{name:<10}{np.median(rates[name]):>10.2f}{np.median(rates[name]) / base:>8.2f}"
                  f"{spread(rates[name]):>8}{first[name]:>15.2f}")
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(TRAIN_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(TRAIN_VARIANTS)}")
    batch = rows(args.batch, args.seq)
    steps = {}
    for v in variants:
        t = time.perf_counter()
        steps[v] = build_step(v, batch)
        print(f"built {v} in {time.perf_counter() - t:.0f} s", flush=True)
    rates = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            time_rate(steps[v], args.batch * args.seq, rates[v])
    base = np.median(rates[variants[0]])
    print(f"\ntraining step, MiniLM-L6, L={args.seq}, B={args.batch}, median of {args.repeats} rounds")
    print(f"{'variant':<16}{'tok/s':>9}{'ratio':>8}{'spread':>8}")
    for v in variants:
        print(f"{v:<16}{np.median(rates[v]):>9.0f}{np.median(rates[v]) / base:>8.2f}{spread(rates[v]):>8}")


if __name__ == "__main__":
    main()
