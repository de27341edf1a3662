"""Fine-tuning: the BERT recipe (AdamW, warmup then linear decay, clipping), FineTuner (the classifier
with its train_step, run by keras.Model.fit on a tf.data pipeline of length-grouped batches), and the
RunFolder callback: resumable checkpoints, validation after each epoch, the best weights, early stopping,
and the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from types import SimpleNamespace
from pathlib import Path

import numpy as np

from . import features as feats
from .classifier import Classifier, dump_yaml, write_atomic
from .config import (DataConfig, TrainConfig, check_types, load_config_file, option,  # noqa: F401
                     options_in_signature, split_options)
from .errors import BertfitError, ConfigError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

LOWER_IS_BETTER = {"loss"}


# -- optimizer and schedule ------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bertfit")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to the peak, then linear decay to 0 at the last step."""

    def __init__(self, peak, total_steps, warmup_steps):
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = step / self.warmup_steps if self.warmup_steps else 1.0  # no warmup: full rate from step 1
        decay = (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)
        return self.peak * keras.ops.maximum(0.0, keras.ops.minimum(warm, decay))

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="bertfit")
class AdamW(keras.optimizers.AdamW):
    """AdamW (PyTorch's update; Keras's but for where epsilon goes, see _adamw_update), fused into
    one pass per variable, plus a learning-rate multiplier per variable (layer-wise lr decay).

    Keras runs clipping, weight decay and Adam as separate whole-tensor operations, and turns the
    word embeddings' gradient (a few hundred gathered rows) into a dense 30522 x 384 table on the
    way: about a dozen passes over memory per variable. Here scaling, weight decay and the Adam
    update run as one XLA-compiled loop over each variable (read var, m, v, gradient; write var, m,
    v), and the embedding's rows are summed before they become a table. Tests compare it with Keras's
    AdamW and with PyTorch's algorithm; what it is worth: bench/levers.py's keras-adamw row in
    bench/RESULTS.md.

    The clipping norm is the gradient's own: a token's gathered rows are summed before they are
    counted, as PyTorch does (Keras's tf.clip_by_global_norm on the gather's IndexedSlices counts
    them one by one; on SST-2 batches the two norms differ by under 1 %).
    """

    def __init__(self, *args, lr_multipliers=None, no_decay=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lr_multipliers = dict(lr_multipliers or {})
        self.no_decay = list(no_decay or [])
        if self.no_decay:
            self.exclude_from_weight_decay(var_names=self.no_decay)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": self._lr_multipliers, "no_decay": self.no_decay}

    def build(self, variables):
        super().build(variables)
        # update_step sees backend variables, so the multipliers are looked up by position.
        self._scales = [self._lr_multipliers.get(v.path, 1.0) for v in variables]

    def _fused(self, variables) -> bool:
        return not (self.amsgrad or self.use_ema or self.gradient_accumulation_steps) and all(
            isinstance(v.value if isinstance(v, keras.Variable) else v, tf.Variable) for v in variables)

    def _backend_apply_gradients(self, grads, trainable_variables):
        # With several replicas, their gradients are summed before clipping (Keras would clip each
        # replica's part, then sum): the step is the one a single device takes on the whole batch.
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            grads = replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if not self._fused(trainable_variables):
            return super()._backend_apply_gradients(grads, trainable_variables)
        grads = [_summed_rows(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        scale = tf.constant(1.0)
        if self.global_clipnorm:  # clip_by_global_norm, as one factor applied in the update
            norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(tf.cast(
                g.values if isinstance(g, tf.IndexedSlices) else g, tf.float32))) for g in grads]))
            clip = self.global_clipnorm
            scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)  # NaN if the norm is not finite
        # Weight decay is folded into update_step; gradients travel with the clipping factor.
        self._backend_update_step([(g, scale) for g in grads], trainable_variables, self.learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        if not isinstance(gradient, tuple):  # Keras's own path (see _fused)
            index = self._get_variable_index(variable)
            learning_rate = learning_rate * self._scales[index] if self._scales[index] != 1.0 else learning_rate
            return super().update_step(gradient, variable, learning_rate)
        gradient, clip_scale = gradient
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        if isinstance(gradient, tf.IndexedSlices):  # unique rows (see _summed_rows): scatter into a table
            gradient = tf.scatter_nd(tf.expand_dims(gradient.indices, 1), gradient.values, tf.shape(variable))
        decay = (tf.cast(self.weight_decay, dtype) * tf.cast(learning_rate, dtype)
                 if self.weight_decay and self._use_weight_decay(variable) else tf.constant(0.0, dtype))
        step = tf.cast(self.iterations + 1, dtype)
        _adamw_update(variable.handle, self._momentums[index].value.handle, self._velocities[index].value.handle,
                      tf.cast(gradient, dtype), tf.cast(clip_scale, dtype), decay,
                      tf.cast(learning_rate, dtype) * self._scales[index], tf.cast(self.beta_1, dtype),
                      tf.cast(self.beta_2, dtype), tf.cast(self.epsilon, dtype), step)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Summed already, before clipping (_backend_apply_gradients).
        return grads_and_vars


def _summed_rows(g: tf.IndexedSlices) -> tf.IndexedSlices:
    """An embedding gradient with each row once (a token seen twice in a batch gives two rows)."""
    rows, position = tf.unique(g.indices)
    return tf.IndexedSlices(tf.math.unsorted_segment_sum(g.values, position, tf.size(rows)), rows, g.dense_shape)


@tf.function(jit_compile=True, autograph=False)
def _adamw_update(var, m, v, gradient, clip_scale, decay, lr, beta_1, beta_2, epsilon, step):
    """AdamW's step on resource handles, in one fused loop: clip, decay (var -= var * decay), then
    Adam (m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
    var -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)).

    Epsilon is added to the bias-corrected sqrt(v), as PyTorch does; Keras adds it to the uncorrected
    one, which makes it 1 / sqrt(1 - b2^t) times larger: 32x at step 1, 3x at step 100. With BERT's
    1e-6 that held back every weight whose gradient is below ~1e-5 during warmup: after 30 SST-2
    steps (dropout off, same batches) the logits were 0.05 off the HF PyTorch loop's (a quarter of
    their size); with this placement and epsilon 1e-8, 1e-7."""
    dtype = gradient.dtype
    g = gradient * clip_scale
    old_m, old_v = (tf.raw_ops.ReadVariableOp(resource=h, dtype=dtype) for h in (m, v))
    new_m = old_m + (g - old_m) * (1 - beta_1)
    new_v = old_v + (tf.square(g) - old_v) * (1 - beta_2)
    denominator = tf.sqrt(new_v / (1 - tf.pow(beta_2, step))) + epsilon
    w = tf.raw_ops.ReadVariableOp(resource=var, dtype=dtype)
    w = w - w * decay
    tf.raw_ops.AssignVariableOp(resource=m, value=new_m)
    tf.raw_ops.AssignVariableOp(resource=v, value=new_v)
    tf.raw_ops.AssignVariableOp(resource=var, value=w - lr / (1 - tf.pow(beta_1, step)) * new_m / denominator)


def layerwise_multipliers(encoder, decay: float) -> dict[str, float]:
    """Sun et al. 2019: the top layer gets the base lr, each layer below `decay` times the one above
    (the embeddings one step below the first layer); whatever sits above the encoder gets the base lr."""
    if decay == 1.0:
        return {}
    n = encoder.config.num_layers
    out = {v.path: decay ** n for v in encoder.embeddings.trainable_variables}
    for i, layer in enumerate(encoder.encoder_layers):
        out.update({v.path: decay ** (n - 1 - i) for v in layer.trainable_variables})
    return out


def optimizer(total_steps: int, learning_rate: float = 5e-5, *, warmup_ratio: float = 0.1,
              weight_decay: float = 0.01, epsilon: float = 1e-8, clipnorm: float | None = 1.0,
              layerwise_lr_decay: float = 1.0, encoder=None) -> AdamW:
    """BERT's fine-tuning optimizer, for `model.compile(optimizer=bertfit.optimizer(...))`: AdamW with
    linear warmup over `warmup_ratio` of `total_steps` then linear decay to 0, no weight decay on
    biases and LayerNorm, clipping at global norm `clipnorm`, the fused update (see AdamW).
    `layerwise_lr_decay` < 1 needs `encoder` (a bertfit.layers.Encoder or BertEncoder)."""
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise ConfigError(f"total_steps must be an integer >= 1 (epochs x steps per epoch), got {total_steps!r}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"warmup_ratio must be between 0 and 1, got {warmup_ratio}")
    if layerwise_lr_decay != 1.0 and encoder is None:
        raise ConfigError("layerwise_lr_decay needs encoder=, the encoder whose layers it scales")
    schedule = WarmupLinearDecay(learning_rate, total_steps, round(warmup_ratio * total_steps))
    return AdamW(learning_rate=schedule, weight_decay=weight_decay, epsilon=epsilon, global_clipnorm=clipnorm or None,
                 lr_multipliers=layerwise_multipliers(encoder, layerwise_lr_decay) if encoder is not None else None,
                 no_decay=["bias", "gamma", "beta"])  # BERT's recipe: no decay on LayerNorm and biases


def make_optimizer(model, config: TrainConfig, total_steps: int) -> AdamW:
    return optimizer(total_steps, config.learning_rate, warmup_ratio=config.warmup_ratio,
                     weight_decay=config.weight_decay, epsilon=config.adam_epsilon, clipnorm=config.max_grad_norm,
                     layerwise_lr_decay=config.layerwise_lr_decay, encoder=model.encoder)


# -- distribution ---------------------------------------------------------------------------
#
# The global batch is the user's batch_size. Every worker builds the same seeded batch plan, so
# every replica sees the same global batch; replica r (of n, numbered across the cluster) takes
# the contiguous rows [r * ceil(B / n), (r + 1) * ceil(B / n)) of it. Each replica's loss is its
# rows' summed loss divided by the *global* batch size; the gradients are summed over the
# replicas (all-reduce) *before* clipping, so one step with n replicas is the step one replica
# takes on the whole batch, and each example is used exactly once per epoch across the cluster.


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one-device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        _check_tf_config()
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"{option('strategy', 'multi-worker')}: {e} (the strategy must be created before any "
                              "other TensorFlow work in the process: one multi-worker run per process)") from None
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise ConfigError(f"{option('strategy', 'tpu')}: no TPU found ({e})") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"unknown strategy {name!r}")


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(f"{option('strategy', 'multi-worker')} needs the TF_CONFIG environment variable "
                          "(the cluster spec)")
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        tasks = cluster[task["type"]]
        tasks[int(task["index"])]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError('TF_CONFIG must be JSON like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                          f'"task": {{"type": "worker", "index": 0}}}}: {e!r}') from None


def is_chief(strategy) -> bool:
    """The one process that writes the run folder: task `chief` if the cluster has one, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def replica_rows(batch_size, num_replicas, replica_id):
    """[start, stop) of the global batch's rows that replica `replica_id` trains on."""
    size = (batch_size + num_replicas - 1) // num_replicas
    start = replica_id * size
    return start, start + size


@contextlib.contextmanager
def dtype_policy(mixed_precision: str | None):
    """The Keras dtype policy for layers built inside: mixed_bfloat16 / mixed_float16 / float32."""
    previous = keras.mixed_precision.dtype_policy()
    name = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}.get(mixed_precision, "float32")
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


# -- the loop -------------------------------------------------------------------------------


class Progress:
    """One status line per epoch: steps, loss, examples/s and ETA (redrawn on a terminal)."""

    def __init__(self, epoch, epochs, total_steps, stream=None):
        self.epoch, self.epochs, self.total, self.stream = epoch, epochs, total_steps, stream or sys.stderr
        self.start, self.last_draw, self.examples = time.perf_counter(), 0.0, 0
        self.tty = self.stream.isatty()

    def update(self, step, loss, examples, final=False):
        self.examples += examples
        now = time.perf_counter()
        if not final and now - self.last_draw < (0.5 if self.tty else 30):
            return
        self.last_draw = now
        elapsed = now - self.start
        rate = self.examples / elapsed if elapsed else 0.0
        eta = elapsed / step * (self.total - step) if step else 0.0
        width = 24
        done = int(width * step / max(1, self.total))
        line = (f"epoch {self.epoch}/{self.epochs} [{'=' * done}{'.' * (width - done)}] {step}/{self.total} "
                f"loss {loss:.4f}  {rate:.1f} ex/s  {'ETA ' + _clock(eta) if not final else _clock(elapsed)}")
        self.stream.write(("\r" + line if self.tty else line + "\n") + ("\n" if final and self.tty else ""))
        self.stream.flush()


def _clock(seconds):
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


STEP_LOSS_POINTS = 100  # per epoch in the history: the report's per-step loss curve


def step_loss_points(losses, points=STEP_LOSS_POINTS) -> list[float]:
    """An epoch's per-step training losses, as at most `points` means of equal runs of steps (each
    point stands for len(losses) / points steps, spread evenly over the epoch)."""
    if len(losses) <= points:
        return [round(float(v), 5) for v in losses]
    edges = np.linspace(0, len(losses), points + 1).astype(int)
    return [round(float(np.mean(losses[a:b])), 5) for a, b in zip(edges[:-1], edges[1:])]


class RunFolder(keras.callbacks.Callback):
    """bertfit's part of `fit`. After each step: the progress line, the NaN check, the step's TensorBoard
    scalars (Keras's TensorBoard callback writes the epoch's), and every
    `checkpoint_every` steps a checkpoint. After each epoch: the validation metrics (also put in the
    epoch's logs as val_*, for the callbacks after this one, such as the user's), the history, the best
    weights, a checkpoint, the on_epoch_end hook and early stopping. A checkpoint is the whole training
    state, the epoch's running loss included, so a resumed run reports what an uninterrupted one does."""

    def __init__(self, run: "Run"):
        super().__init__()
        self.run = run
        self.batches, self.progress, self.recent = [], None, []

    def on_epoch_begin(self, epoch, logs=None):
        run = self.run
        self.batches = run.plan(run.state["epoch"])
        self.progress = Progress(run.state["epoch"] + 1, run.config.epochs, len(self.batches))
        self.recent = []

    def on_train_batch_end(self, batch, logs=None):
        run, state = self.run, self.run.state
        b, config = state["batch"], run.config
        loss = float(np.asarray(logs["loss"]).reshape(-1)[0]) * config.gradient_accumulation
        if not math.isfinite(loss):
            raise BertfitError(f"the training loss became {loss} at epoch {state['epoch'] + 1}, batch {b + 1}: "
                               f"lower {option('learning_rate')} (or use bf16 instead of fp16)")
        rows = self.batches[b]
        self.recent = self.recent[-49:] + [loss]
        state.update(batch=b + 1, loss_sum=state["loss_sum"] + loss, loss_count=state["loss_count"] + 1,
                     train_tokens=state["train_tokens"] + len(rows) * int(run.lengths[rows].max()))
        state.setdefault("step_losses", []).append(round(loss, 5))
        self.progress.update(b + 1, float(np.mean(self.recent)), len(rows))
        apply = (b + 1) % config.gradient_accumulation == 0 or b + 1 == len(self.batches)
        step = int(run.tuner.optimizer.iterations.numpy())
        if run.writer is not None and step % 10 == 0 and apply:
            # Beside Keras's epoch_* tags in logs/train (by optimizer step: continuous across a resume).
            with run.writer.as_default(step=step):
                tf.summary.scalar("batch_loss", float(np.mean(self.recent[-10:])))
                tf.summary.scalar("batch_learning_rate", float(run.tuner.optimizer.learning_rate))
        if apply and config.checkpoint_every and step % config.checkpoint_every == 0 and b + 1 < len(self.batches):
            run.checkpoint()

    def on_epoch_end(self, epoch, logs=None):
        run, state = self.run, self.run.state
        epoch = state["epoch"] + 1
        self.progress.update(len(self.batches), float(np.mean(self.recent)) if self.recent else float("nan"), 0,
                             final=True)
        val_metrics, _, _ = run.evaluate()
        record = {"epoch": epoch, "loss": state["loss_sum"] / state["loss_count"] if state["loss_count"] else None,
                  "val_loss": val_metrics["log_loss"],
                  **{f"val_{k}": v for k, v in val_metrics.items() if isinstance(v, float) and k != "log_loss"},
                  "step_loss": step_loss_points(state.get("step_losses", []))}
        state["history"].append(record)
        if logs is not None:
            logs.update({k: v for k, v in record.items() if k not in ("epoch", "step_loss") and v is not None})
        value = val_metrics["log_loss"] if run.metric == "loss" else val_metrics[run.metric]
        run.log(f"epoch {epoch}: validation {run.metric} {value:.4f}, loss {val_metrics['log_loss']:.4f}")
        best = state["best"]
        if best is None or (value < best if run.metric in LOWER_IS_BETTER else value > best):
            state.update(best=value, best_epoch=epoch, stale=0)
            run.keep_best()
        else:
            state["stale"] += 1
        state.update(epoch=epoch, batch=0, loss_sum=0.0, loss_count=0, step_losses=[])
        run.checkpoint()
        if run.on_epoch_end is not None:
            run.on_epoch_end(epoch, val_metrics)
        if run.config.early_stopping and state["stale"] >= run.config.early_stopping:
            run.log(f"early stopping: no improvement in validation {run.metric} for {state['stale']} epoch(s)")
            self.model.stop_training = True
            run.stopped = True


class FineTuner(keras.Model):
    """The classifier with BERT's training step, for `model.fit` (and `train_on_batch`).

    A batch is (inputs, labels, weights). A row's weight is its class weight divided by the rows of one
    update (the global batch times gradient_accumulation), so that the weighted losses summed over the
    batch and over every replica make the update's mean loss (see the comment at make_strategy): the
    optimizer sums the replicas' gradients before it clips them. With gradient_accumulation k, the
    gradients of k batches are summed and applied at every k-th batch of an epoch and at its last.
    """

    def __init__(self, classifier: Classifier, config: TrainConfig, batches_per_epoch: int):
        super().__init__()  # in the distribution strategy's scope, if any: fit runs its steps in that strategy
        self.net, self.multilabel = classifier.model, classifier.multilabel
        self.accumulation, self.batches_per_epoch = config.gradient_accumulation, batches_per_epoch
        if self.distribute_strategy.num_replicas_in_sync > 1 and self.accumulation > 1:
            raise ConfigError("gradient_accumulation with several replicas is not supported: raise batch_size instead")
        optimizer = make_optimizer(self.net, config, max(1, math.ceil(batches_per_epoch / self.accumulation) * config.epochs))
        if config.mixed_precision == "fp16":
            # float16 gradients underflow: the loss is scaled up before the backward pass and the
            # gradients scaled down before clipping and the update. Keras' dynamic scale starts at
            # 2**15, halves (and skips the step) on inf/nan and doubles after 2000 finite steps.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(self.net.trainable_variables)
        self.accumulators = [tf.Variable(tf.zeros_like(v), trainable=False)
                             for v in self.net.trainable_variables] if self.accumulation > 1 else []
        self.batches_seen = tf.Variable(0, trainable=False, dtype=tf.int64) if self.accumulation > 1 else None
        self.compile(optimizer=optimizer, jit_compile=False)
        # XLA for the forward and backward pass only: the update's all-reduce stays outside it.
        self._gradients_fn = (tf.function(self._gradients, jit_compile=True, autograph=False) if config.jit
                              else self._gradients)

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Everything is built already. Under a strategy, Keras's fit would build from the first batch
        # averaged over the replicas, which fails when their parts differ in shape (length-grouped rows).
        pass

    def _gradients(self, inputs, labels, weights):
        with tf.GradientTape() as tape:
            logits = tf.cast(self.net(inputs, training=True), tf.float32)
            if self.multilabel:
                per_example = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), -1)
            else:
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.reduce_sum(per_example * weights)
            scaled = self.optimizer.scale_loss(loss)  # fp16: times the loss scale; else the loss itself
        return loss, tape.gradient(scaled, self.net.trainable_variables)

    def train_step(self, data):
        inputs, labels, weights = data
        variables = self.net.trainable_variables
        loss, grads = self._gradients_fn(inputs, labels, weights)
        if self.accumulation == 1:
            self.optimizer.apply_gradients(zip(grads, variables))
        else:
            for acc, g in zip(self.accumulators, grads):
                # An embedding's gradient (gathered rows) is added row by row, not as a whole dense table.
                acc.scatter_add(g) if isinstance(g, tf.IndexedSlices) else acc.assign_add(g)
            b = self.batches_seen % self.batches_per_epoch + 1  # this batch's number in its epoch
            tf.cond((b % self.accumulation == 0) | (b == self.batches_per_epoch), self._apply_accumulated, tf.no_op)
            self.batches_seen.assign_add(1)
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            # The batch's loss, on every replica; as a vector, which Keras's multi-worker mean needs.
            loss = tf.reshape(replica.all_reduce(tf.distribute.ReduceOp.SUM, loss), [1])
        return {"loss": loss}

    def _apply_accumulated(self):
        self.optimizer.apply_gradients(zip([a.read_value() for a in self.accumulators], self.net.trainable_variables))
        for acc in self.accumulators:
            acc.assign(tf.zeros_like(acc))
        return tf.no_op()

    # -- state ----------------------------------------------------------------------------

    def _state_variables(self, with_optimizer):
        variables = list(self.net.variables)
        if with_optimizer:
            variables += list(self.optimizer.variables) + self.accumulators
            variables += [self.batches_seen] if self.batches_seen is not None else []
        return variables

    def state_arrays(self, with_optimizer=True) -> list[np.ndarray]:
        return [np.asarray(keras.ops.convert_to_numpy(v)) for v in self._state_variables(with_optimizer)]

    def load_state_arrays(self, arrays, with_optimizer=True, source="checkpoint"):
        variables = self._state_variables(with_optimizer)
        if len(arrays) != len(variables):
            raise BertfitError(f"{source}: holds {len(arrays)} tensors, this run has {len(variables)}: "
                               "it was written by a different model or options")
        for v, a in zip(variables, arrays):
            if tuple(v.shape) != a.shape:
                raise BertfitError(f"{source}: tensor for {v.path} has shape {a.shape}, expected {tuple(v.shape)}")
            v.assign(a)


def training_batches(features, rows, labels, weights, config, pad_id, strategy, epochs, skip=0):
    """The tf.data pipeline of training batches (inputs, labels, weights) from the token cache, for
    `epochs` (a range), the first `skip` batches of the first left out (a resumed run has done them).

    Every process builds the same seeded, length-grouped plan; under a distribution strategy each
    replica gets its contiguous part of every global batch (replica_rows), through
    distribute_datasets_from_function: one input pipeline per worker, yielding its replicas' parts
    in turn."""
    lengths = features.lengths[rows]
    multilabel = labels.ndim == 2
    signature = ({k: tf.TensorSpec([None, None], tf.int32) for k in ("token_ids", "segment_ids", "padding_mask")},
                 tf.TensorSpec([None, labels.shape[1]] if multilabel else [None], tf.float32 if multilabel else tf.int32),
                 tf.TensorSpec([None], tf.float32))

    def batches(replicas=(0,), num_replicas=1):
        for epoch in epochs:
            for b, batch in enumerate(feats.batch_plan(lengths, config.batch_size, shuffle=True, seed=config.seed,
                                                       epoch=epoch)):
                if epoch == epochs[0] and b < skip:
                    continue
                batch = rows[batch]
                scale = np.float32(1.0 / (len(batch) * config.gradient_accumulation))
                for r in replicas:
                    start, stop = replica_rows(len(batch), num_replicas, r)
                    part = batch[start:stop]
                    if len(part):
                        inputs = feats.pad_batch(features, part, pad_id)
                    else:  # a short last batch leaves this replica nothing
                        inputs = {k: np.zeros((0, 1), "int32") for k in signature[0]}
                    yield inputs, labels[part], (scale * weights[part]).astype("float32")

    if strategy is tf.distribute.get_strategy():
        return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)

    def pipeline(context):
        local = context.num_replicas_in_sync // context.num_input_pipelines
        mine = tuple(range(context.input_pipeline_id * local, (context.input_pipeline_id + 1) * local))
        dataset = tf.data.Dataset.from_generator(lambda: batches(mine, context.num_replicas_in_sync),
                                                 output_signature=signature)
        return dataset.prefetch(2)

    return strategy.distribute_datasets_from_function(pipeline)


def save_arrays(path: Path, arrays: list[np.ndarray]):
    from .checkpoints._common import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a failed write (a full disk) leaves no part behind
        np.savez(f, *arrays)


def load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


# -- fine_tune ------------------------------------------------------------------------------


def balanced_class_weights(y: np.ndarray, num_labels: int) -> np.ndarray:
    counts = np.bincount(y, minlength=num_labels).astype("float64")
    return (len(y) / (num_labels * np.maximum(counts, 1))).astype("float32")


def resolve_metric(config: TrainConfig, multilabel: bool) -> str:
    if config.metric != "auto":
        if multilabel and config.metric in ("roc_auc", "pr_auc", "f1_positive"):
            raise ConfigError(f"metric {config.metric} is defined for binary tasks only")
        return config.metric
    return "f1_macro" if multilabel else "accuracy"


def single_class_warnings(y, probs, names, multilabel) -> list[str]:
    """A warning when the model answers one class for every validation example of several classes: it
    has learned the labels' balance, not the task, whatever its accuracy says."""
    if multilabel or len(np.unique(y)) < 2:
        return []
    predicted = np.unique(np.argmax(probs, axis=1))
    if len(predicted) > 1:
        return []
    return [f"the model predicts {names[predicted[0]]!r} for every validation example: it has learned how "
            f"often each label occurs, not how to tell them apart. Train with {option('class_weight', 'balanced')} "
            f"and {option('metric', 'f1_macro')}, more epochs or another {option('learning_rate')}; check "
            "the labels with bertfit inspect"]


def prepare_out(out: Path, overwrite: bool, resume: bool):
    """Refuse to clobber anything unless asked; never delete a folder bertfit did not make."""
    if out.exists() and not out.is_dir():
        raise BertfitError(f"{out} is a file, not a folder: choose another {option('out')}")
    if resume:
        if not (out / "config.yaml").exists():
            raise BertfitError(f"{out}: nothing to resume (no config.yaml from an earlier `bertfit train`)")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise BertfitError(f"{out} already exists and is not empty: pass {option('overwrite', True)} to replace "
                               f"it, {option('resume', True)} to continue it, or choose another {option('out')}")
        if not ((out / "config.yaml").exists() and ((out / "run.json").exists() or (out / "checkpoints").exists())):
            raise BertfitError(f"{out} does not look like a bertfit run folder: not deleting it, even with "
                               f"{option('overwrite', True)}")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BertfitError(f"cannot write to the output folder {out}: {e.strerror}") from None


def label_log_odds(y: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of each label's share of the multi-hot rows y, smoothed so that a label seen
    in every row or in none stays finite."""
    p = (y.sum(axis=0) + 0.5) / (len(y) + 1.0)
    return np.log(p / (1.0 - p)).astype("float32")


def fine_tune(train=None, validation=None, test=None, *, text=None, pair=None, label=None, model=None, out=None,
              overwrite=False, resume=False, config_file=None, log=print, on_epoch_end=None, callbacks=None,
              command=None, **options) -> Classifier:
    """bertfit.fine_tune (its docstring says what each argument does; the signatures are the same)."""
    from . import __version__, resume as resuming
    from .tokenization import BertTokenizer  # noqa: F401  (fail early if tensorflow-text is broken)

    out = Path(out) if out is not None else None
    if resume and out is None:
        raise ConfigError(f"{option('resume', True)} needs {option('out')} (the run folder to continue)")
    if resume and _is_complete(out):
        log(f"{out} is complete: nothing to do (to train it again, pass {option('overwrite', True)})")
        return _load_complete(out)
    sources = {"train": train, "validation": validation, "test": test}
    if resume and (out / "config.yaml").exists():
        sources = resuming.resumed_sources(out, sources)
        train, validation, test = sources["train"], sources["validation"], sources["test"]
    elif train is None and not resume:
        raise ConfigError("no training data: give train (a file, folder, DataFrame or tf.data.Dataset)")
    data_config, config = _resolve_options(train, text, pair, label, model, out if resume else None, config_file,
                                           options)
    strategy = make_strategy(config.strategy)  # first: MultiWorkerMirroredStrategy must precede other TF work
    chief = is_chief(strategy)
    fresh = out is not None and chief and not resume and not (out.is_dir() and any(out.iterdir()))
    new_folder = fresh and not out.exists()
    if out is not None and (chief or resume):  # other workers write nothing (on resume they read the chief's)
        prepare_out(out, overwrite, resume)
    keras.utils.set_random_seed(config.seed)
    try:
        data = _read_and_tokenize(train, validation, test, data_config, config, strategy, out if chief else None, log)
        if out is not None and chief and not resume:  # the data read well: record what it was
            resuming.record(out, sources, command, __version__)
        clf = _classifier(data, data_config, config, strategy)
        run = Run(clf, data, strategy, out, chief, resume, log, on_epoch_end)
    except BaseException:
        # Bad data or a bad model: leave no half-made run folder (or token cache) to block the corrected
        # command; a folder that was there, empty, stays, emptied again.
        if fresh:
            _remove_started(out, new_folder)
        raise
    run.train(callbacks)
    if data.remove_cache is not None:
        data.remove_cache()
    return run.finish()


options_in_signature(fine_tune)


RESUME_MAY_CHANGE = ("export", "keep_checkpoints", "eval_batch_size")


def _is_complete(out: Path) -> bool:
    try:
        return json.loads((out / "run.json").read_text()).get("state") == "complete"
    except (OSError, ValueError):
        return False


def _load_complete(out: Path) -> Classifier:
    from .classifier import load

    clf = load(out)
    clf.metrics, clf.run_dir = json.loads((out / "metrics.json").read_text()), out
    return clf


def _remove_started(out: Path, new_folder: bool):
    """Remove what a run that failed before training wrote: the folder if it made it, else its contents."""
    if new_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in out.iterdir():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _resolve_options(train, text, pair, label, model, resumed, config_file, options):
    """(DataConfig, TrainConfig): a resumed run's own, or the YAML file's under the explicit options."""
    from .data import dataset_options

    flat = load_config_file(config_file) if config_file else {}
    flat.update({k: v for k, v in options.items() if v is not None})
    for key, value in (("text_column", text), ("pair_column", pair), ("label_column", label), ("model", model)):
        if value is not None:
            flat[key] = value
    flat.update(dataset_options(train))  # a tuple dataset's parts are (text, [pair,] label)
    if resumed is None:
        data_options, train_options = split_options(flat)
        return DataConfig.from_dict(data_options), TrainConfig.from_dict(train_options)
    import yaml

    from .resume import check_options

    saved = yaml.safe_load((resumed / "config.yaml").read_text()) if (resumed / "config.yaml").exists() else None
    if saved is None:
        raise BertfitError(f"{resumed}: nothing to resume (no config.yaml from an earlier `bertfit train`)")
    # A resumed run keeps its own options, except those that do not change what it learns.
    outcome_free = {k: flat.pop(k) for k in RESUME_MAY_CHANGE if k in flat}
    check_options(resumed, saved["data"], saved["train"], flat)
    return DataConfig.from_dict(saved["data"]), TrainConfig.from_dict({**saved["train"], **outcome_free})


def _read_and_tokenize(train, validation, test, data_config, config, strategy, out, log) -> SimpleNamespace:
    """The pretrained model, the label vocabulary and the tokenized training and validation data.

    A training file streams through the tokenizer into a token cache on disk (any size; its texts are
    never all in memory); data already in memory is tokenized there. Without validation data, a
    stratified part of the training data is held out (its rows are already tokenized)."""
    from .checkpoints import load_pretrained
    from .data import Examples, LabelVocab, read_examples, read_subset, stratified_indices

    def read(source):
        if source is None or isinstance(source, Examples):
            return source
        return read_examples(source, **data_config.read_options())

    if config.class_weight and data_config.multilabel:
        raise ConfigError(f"{option('class_weight', 'balanced')} is for single-label tasks")
    val_ex, test_ex = read(validation), read(test)
    with strategy.scope(), dtype_policy(config.mixed_precision):
        pretrained = load_pretrained(config.model, lower_case=config.lower_case)
    if pretrained.config.max_positions < (config.max_length or 0):
        raise ConfigError(f"max_length {config.max_length} exceeds the model's {pretrained.config.max_positions} positions")
    encode_options = feats.encode_options(config)
    t0 = time.perf_counter()
    train_ex, remove_cache = (None if isinstance(train, (str, os.PathLike)) else read(train)), None
    if train_ex is None:
        # In the run folder (a big file's tokens may not fit in /tmp, often held in memory); deleted
        # when training ends, or when a resumed run starts (what a killed run left).
        for stale in (out.glob(".token-cache-*") if out is not None else ()):
            shutil.rmtree(stale, ignore_errors=True)
        cache = tempfile.mkdtemp(prefix=".token-cache-", dir=out)
        train_labels, train_f = feats.encode_file(pretrained.tokenizer, train, data_config.read_options(), cache,
                                                  **encode_options)
        remove_cache = weakref.finalize(train_f, shutil.rmtree, cache, True)  # also if training fails
        train_source = str(train)
    else:
        train_labels, train_source = train_ex.labels, train_ex.source
        train_f = feats.encode(pretrained.tokenizer, train_ex.texts, train_ex.pairs, **encode_options)
    # Multi-label by the options, or by the labels themselves (JSON lists, lists in memory).
    vocab = LabelVocab.from_labels(train_labels, multilabel=data_config.multilabel, source=train_source)
    if config.class_weight and vocab.multilabel:
        raise ConfigError(f"{option('class_weight', 'balanced')} is for single-label tasks")
    metric = resolve_metric(config, vocab.multilabel)
    y_all = vocab.encode(train_labels, source=train_source)
    kept = np.arange(train_f.num_examples)
    if val_ex is None:
        kept, held = stratified_indices(train_labels, train_f.num_examples, config.validation_split, config.seed,
                                        train_source)
        val_ex = (train_ex.subset(held) if train_ex is not None
                  else read_subset(train, held, train_labels, **data_config.read_options()))
        val_f = train_f.select(held)
        log(f"no validation file: holding out a stratified {config.validation_split:.0%} of the training data "
            f"({len(val_ex)} examples, seed {config.seed})")
    else:
        val_f = feats.encode(pretrained.tokenizer, val_ex.texts, val_ex.pairs, **encode_options)
    train_rows = train_f.rows_of(kept)
    log(f"tokenized {len(kept)} training and {len(val_ex)} validation examples in {time.perf_counter() - t0:.1f}s "
        f"({len(train_rows)} rows, mean {train_f.lengths[train_rows].mean():.0f} tokens)")
    if metric in ("roc_auc", "pr_auc", "f1_positive") and len(vocab.names) != 2:
        raise ConfigError(f"metric {metric} is defined for binary tasks only")
    return SimpleNamespace(pretrained=pretrained, vocab=vocab, metric=metric, train_f=train_f, train_rows=train_rows,
                           kept=kept, y_all=y_all, y_train=y_all[kept], val_ex=val_ex, val_f=val_f,
                           y_val=vocab.encode(val_ex.labels, source=val_ex), test_ex=test_ex,
                           remove_cache=remove_cache)


def _classifier(data, data_config, config, strategy) -> Classifier:
    from .modeling import BertClassifier, dummy_inputs

    with strategy.scope(), dtype_policy(config.mixed_precision):
        encoder = data.pretrained.encoder
        for layer in encoder._flatten_layers():
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = config.dropout
        net = BertClassifier(encoder, len(data.vocab.names), dropout=config.dropout, pooling=config.pooling)
        net(dummy_inputs())
        if data.vocab.multilabel:
            # Each label's bias starts at its log-odds in the training data. From 0 (p = 0.5), Adam moves a
            # bias about one learning rate per step: at 5e-5 a rare label (p = 0.02, log-odds -3.9) would
            # need ~80k steps, so the encoder spends the run pushing every logit down instead.
            net.classifier.bias.assign(label_log_odds(data.y_train))
    return Classifier(net, data.pretrained.tokenizer, data.vocab.names, multilabel=data.vocab.multilabel,
                      train_config=config, data_config=data_config)


class Run:
    """One fine-tuning run: its FineTuner, its state (saved in checkpoints/last.json beside the arrays in
    last.npz), its run folder and its final results. Only the chief writes the folder (self.out is None
    in the other processes); on resume every process reads the chief's checkpoint."""

    def __init__(self, clf, data, strategy, out, chief, resume, log, on_epoch_end):
        self.clf, self.data, self.strategy, self.log, self.on_epoch_end = clf, data, strategy, log, on_epoch_end
        self.out = out if chief else None
        self.config, self.data_config, self.metric = clf.train_config, clf.data_config, data.metric
        self.lengths = data.train_f.lengths
        self.batches_per_epoch = math.ceil(len(data.train_rows) / self.config.batch_size)
        with strategy.scope():
            self.tuner = FineTuner(clf, self.config, self.batches_per_epoch)
        # train_tokens: padded tokens fed to the model, the work actually done (a speed measure).
        self.state = {"epoch": 0, "batch": 0, "history": [], "best": None, "best_epoch": None, "stale": 0,
                      "train_tokens": 0, "loss_sum": 0.0, "loss_count": 0, "step_losses": []}
        self.best, self.stopped, self.writer, self.train_seconds = None, False, None, 0.0
        self.ckpt_dir = out / "checkpoints" if out is not None else None
        if self.out is not None:
            self.ckpt_dir.mkdir(exist_ok=True)
            if not resume:
                resolved = {"data": self.data_config.read_options(), "train": dataclasses.asdict(self.config)}
                write_atomic(out / "config.yaml", dump_yaml(resolved))
            write_atomic(out / "run.json", json.dumps({"state": "training"}))
            self.writer = tf.summary.create_file_writer(str(out / "logs" / "train"))
        if resume and (self.ckpt_dir / "last.npz").exists():
            self.tuner.load_state_arrays(load_arrays(self.ckpt_dir / "last.npz"), source=str(self.ckpt_dir / "last.npz"))
            self.state.update(json.loads((self.ckpt_dir / "last.json").read_text()))
            log(f"resuming at epoch {self.state['epoch'] + 1}, batch {self.state['batch']}")

    def checkpoint(self):
        if self.out is not None:
            save_arrays(self.ckpt_dir / "last.npz", self.tuner.state_arrays())
            write_atomic(self.ckpt_dir / "last.json", json.dumps(self.state))

    def keep_best(self):
        """The best weights so far: in best.npz, or in memory where this process writes nothing."""
        arrays = self.tuner.state_arrays(with_optimizer=False)
        if self.out is not None:
            save_arrays(self.ckpt_dir / "best.npz", arrays)
        else:
            self.best = arrays

    def evaluate(self):
        """Validation metrics; multi-label ones at per-label thresholds chosen on these predictions,
        as the final model's are (at 0.5, a multi-label model's early epochs score F1 near 0)."""
        from .evaluation import choose_thresholds, classification_metrics

        d, multilabel = self.data, self.clf.multilabel
        probs = self.clf.predict_features(d.val_f)
        thresholds = choose_thresholds(d.y_val, probs) if multilabel else None
        m = classification_metrics(d.y_val, probs, d.vocab.names, multilabel=multilabel, thresholds=thresholds)
        return m, probs, thresholds

    def plan(self, epoch):
        """The rows of each batch of an epoch, as training_batches makes them."""
        rows = self.data.train_rows
        return [rows[b] for b in feats.batch_plan(self.lengths[rows], self.config.batch_size, shuffle=True,
                                                  seed=self.config.seed, epoch=epoch)]

    def train(self, callbacks=None):
        """model.fit over the epochs left; a run resumed mid-epoch first finishes that epoch alone."""
        config, d, state = self.config, self.data, self.state
        row_labels = d.y_all[d.train_f.example_index].astype("float32" if self.clf.multilabel else "int32")
        class_weights = balanced_class_weights(d.y_train, len(d.vocab.names)) if config.class_weight else None
        row_weights = (class_weights[row_labels] if class_weights is not None
                       else np.ones(len(row_labels))).astype("float32")
        # Keras's TensorBoard writes the epoch logs RunFolder completes (train/ and validation/ epoch_*
        # tags, which TensorBoard overlays); only the process that writes the run folder has one.
        board = [keras.callbacks.TensorBoard(str(self.out / "logs"), write_graph=False)] if self.out is not None else []
        fit_callbacks = [RunFolder(self), *board, *(callbacks or [])]

        def fit(epochs, skip=0):
            batches = training_batches(d.train_f, d.train_rows, row_labels, row_weights, config,
                                       self.clf.tokenizer.pad_id, self.strategy, epochs, skip)
            self.tuner.fit(batches, initial_epoch=epochs[0], epochs=epochs[-1] + 1,
                           steps_per_epoch=self.batches_per_epoch - skip, shuffle=False,  # the plan is shuffled
                           verbose=0, callbacks=fit_callbacks)

        steps = math.ceil(self.batches_per_epoch / config.gradient_accumulation)
        accumulated = f" x {config.gradient_accumulation} accumulated" if config.gradient_accumulation > 1 else ""
        self.log(f"training {config.epochs} epoch(s) x {steps} steps, batch {config.batch_size}{accumulated}, "
                 f"lr {config.learning_rate:g}, {self.strategy.num_replicas_in_sync} replica(s); "
                 f"best by validation {self.metric}")
        start = time.perf_counter()
        if state["batch"] and state["epoch"] < config.epochs:
            fit(range(state["epoch"], state["epoch"] + 1), skip=state["batch"])
        if state["epoch"] < config.epochs and not self.stopped:
            fit(range(state["epoch"], config.epochs))
        self.train_seconds = time.perf_counter() - start
        if state["best_epoch"] is not None and state["best_epoch"] != len(state["history"]):
            arrays = self.best if self.best is not None else load_arrays(self.ckpt_dir / "best.npz")
            self.tuner.load_state_arrays(arrays, with_optimizer=False, source="best checkpoint")
            self.log(f"restored the best weights (epoch {state['best_epoch']})")

    def finish(self) -> Classifier:
        """The final metrics (on the test data if given, else validation), and the finished run folder."""
        from .evaluation import classification_metrics, write_report

        clf, d, state, out, multilabel = self.clf, self.data, self.state, self.out, self.clf.multilabel
        val_metrics, val_probs, clf.thresholds = self.evaluate()
        results = {"validation": val_metrics}
        split, y, probs, examples = "validation", d.y_val, val_probs, d.val_ex
        if d.test_ex is not None:
            split, y, examples = "test", d.vocab.encode(d.test_ex.labels, source=d.test_ex), d.test_ex
            probs = clf.predict_proba(d.test_ex.texts, d.test_ex.pairs)
            results["test"] = classification_metrics(y, probs, d.vocab.names, multilabel=multilabel,
                                                     thresholds=clf.thresholds)
        seconds = round(self.train_seconds, 1)
        warnings = single_class_warnings(d.y_val, val_probs, d.vocab.names, multilabel)
        for warning in warnings:
            self.log(f"warning: {warning}")
        clf.metrics = {**results[split], "split": split, "splits": results, "history": state["history"],
                       "best_epoch": state["best_epoch"], "train_seconds": seconds,
                       "train_tokens": state.get("train_tokens", 0), "train_examples": len(d.kept),
                       "warnings": warnings}
        if out is not None:
            write_atomic(out / "metrics.json", json.dumps(clf.metrics, indent=2))
            write_report(out / "report.html", metrics=results[split], label_names=d.vocab.names, y_true=y,
                         probs=probs, texts=examples.texts, pairs=examples.pairs, history=state["history"],
                         multilabel=multilabel, thresholds=clf.thresholds, title=f"bertfit: {out.name} ({split})",
                         config=clf.config_dict(), metric=self.metric, truncation=self.config.truncation,
                         where=examples.where, unit=examples.unit)
            if self.config.export:
                from .export import export_saved_model

                export_saved_model(clf, out / "saved_model")
            clf.save(out, extra_state={"best_epoch": state["best_epoch"], "train_seconds": seconds})
            self.writer.close()
            if not self.config.keep_checkpoints:  # complete: nothing will resume from them
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        clf.run_dir = out
        return clf
