"""A fine-tuned classifier: tokenizer + encoder + head + labels, and the run folder it lives in.

Run folder contract (what `save` writes and `load` reads; nothing else is needed):
    config.yaml          resolved config: encoder, lower_case, labels, multilabel, thresholds, data, train
    weights.safetensors  canonical encoder weights + classifier/{kernel,bias} (best epoch)
    vocab.txt            WordPiece vocabulary
    run.json             {"state": "complete", ...}: written last, so a killed run never looks complete
Training adds source.json (data files and command line, for --resume), metrics.json, report.html,
logs/ (TensorBoard), checkpoints/ (while incomplete, or with keep_checkpoints) and saved_model/.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from . import features as feats
from .config import DataConfig, EncoderConfig, TrainConfig, option, read_yaml_mapping
from .errors import BertfitError, ConfigError


def write_atomic(path: Path, data: bytes | str):
    """Write a file so that readers see either the old or the whole new content."""
    from .checkpoints._common import atomic_path

    with atomic_path(path) as tmp:  # removed if the write fails (a full disk)
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def dump_yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True)


JIT_LENGTH_STEP = 16  # with XLA inference, batch lengths are padded to a multiple of this


def keep_xla_programs(directory=None) -> Path | None:
    """Have TensorFlow keep the programs XLA compiles on disk, so that `--jit` inference compiles each
    batch shape once per machine instead of once per process (TF's persistent compilation cache).

    The folder: `directory`, else $BERTFIT_XLA_CACHE, else ~/.cache/bertfit/xla. TensorFlow reads
    TF_XLA_FLAGS once, when it starts, so this works only before then (the CLI calls it first) and
    leaves a cache directory the user set in TF_XLA_FLAGS alone. Returns the folder, or None.
    """
    import sys

    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tensorflow" in sys.modules or "tf_xla_persistent_cache_directory" in flags:
        return None
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    directory = Path(directory or os.environ.get("BERTFIT_XLA_CACHE") or cache_home / "bertfit" / "xla")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # no cache: each process compiles again
    os.environ["TF_XLA_FLAGS"] = (f"{flags} --tf_xla_persistent_cache_directory={directory} "
                                  "--tf_xla_persistent_cache_device_types=CPU,GPU").strip()
    return directory


class Classifier:
    """A fine-tuned BERT classifier. Binary tasks are 2-class softmax; multi-label is a sigmoid per label."""

    def __init__(self, model, tokenizer, labels, *, multilabel=False, thresholds=None,
                 train_config: TrainConfig | None = None, data_config: DataConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.multilabel = multilabel
        self.thresholds = None if thresholds is None else np.asarray(thresholds, "float32")
        self.train_config = train_config or TrainConfig()
        self.data_config = data_config or DataConfig()
        self.run_dir = None  # the run folder fine_tune wrote (None: none, or not this worker's to write)
        self.jit = False  # XLA-compile inference (predict, evaluate): see predict_features
        self._forwards = {}

    @property
    def encoder_config(self) -> EncoderConfig:
        return self.model.encoder.config

    # -- inference ---------------------------------------------------------------------

    def forward_fn(self, jit: bool = False):
        """A traced inference function: padded batch -> probabilities (built once, no retracing).

        jit=True: XLA-compiled, once per input shape (see predict_features)."""
        if jit not in self._forwards:
            import tensorflow as tf

            spec = tf.TensorSpec([None, None], tf.int32)
            model, multilabel = self.model, self.multilabel

            # autograph off: no tensor-dependent Python
            @tf.function(input_signature=[spec, spec, spec], autograph=False, jit_compile=jit or None)
            def forward(token_ids, segment_ids, padding_mask):
                logits = tf.cast(model({"token_ids": token_ids, "segment_ids": segment_ids,
                                        "padding_mask": padding_mask}, training=False), tf.float32)
                return tf.sigmoid(logits) if multilabel else tf.nn.softmax(logits)

            self._forwards[jit] = forward
        return self._forwards[jit]

    def _score_budget(self) -> int | None:
        """Rows x length^2 per inference batch on a CPU: None (no limit) where a GPU is used.

        A CPU's attention over long rows is bound by memory traffic: each layer writes and re-reads
        a [rows, heads, length, length] float32 score tensor. Kept near 16 MB (a typical L3 cache),
        the softmax runs from cache: on the 2-core test machine, with oneDNN off, batches of 1 at
        length 512 gave 1.56x the examples/s of batches of 32; with oneDNN on (as bertfit now runs)
        0.98x, i.e. no longer a gain (bench/levers.py --inference --seq 512, bench/RESULTS.md). It still
        bounds memory: 32 rows at 512 would hold 400 MB of scores per layer, where `predict` on 2,000
        IMDB reviews peaks at the same RSS as on SST-2's short sentences (bench/infer_real.py).
        With MiniLM's 12 heads: 1 row at 512, 5 at 256, 21 at 128, all of a batch at 64 and below.
        """
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            return None
        return (16 << 20) // (4 * self.encoder_config.num_heads)

    def encode(self, texts, pairs=None) -> feats.Features:
        return feats.encode(self.tokenizer, texts, pairs, **feats.encode_options(self.train_config))

    def predict_features(self, features: feats.Features, batch_size: int | None = None,
                         jit: bool | None = None) -> np.ndarray:
        """Probabilities per example [N, labels], batched by length so that padding stays small.

        jit (default: self.jit): XLA-compile the forward pass. XLA compiles once per input shape
        (a second or more each for MiniLM on a CPU), so batches are padded to a few shapes: lengths
        to a multiple of JIT_LENGTH_STEP, and the last batch's rows up to the batch size. On the 2-core
        test machine the compiled pass is ~1.18x faster on a fixed shape, but on real jobs (SST-2 dev,
        2,000 IMDB reviews) compiling, or loading what keep_xla_programs kept, and the extra padding
        cost as much as it saved (bench/RESULTS.md): meant for accelerators and long fixed-shape jobs."""
        jit = self.jit if jit is None else jit
        forward = self.forward_fn(jit)
        step = JIT_LENGTH_STEP if jit else 1
        out = np.zeros((len(features), len(self.labels)), "float32")
        size, budget = batch_size or self.train_config.eval_batch_size, self._score_budget()
        plan = feats.batch_plan(features.lengths, size, shuffle=False, max_scores=budget, length_step=step)
        for rows in plan:
            b = feats.pad_batch(features, rows, self.tokenizer.pad_id, length_step=step,
                                max_positions=self.encoder_config.max_positions)
            if jit:  # the row count the plan gives every full batch of this length
                full = feats.rows_within(budget, b["token_ids"].shape[1], size)
                b = {k: np.pad(v, ((0, full - len(rows)), (0, 0))) for k, v in b.items()}
            out[rows] = forward(b["token_ids"], b["segment_ids"], b["padding_mask"]).numpy()[:len(rows)]
        return feats.per_example(out, features)

    def predict_proba(self, texts, pairs=None) -> np.ndarray:
        """texts: a string, a list of them, or a tf.data.Dataset of the texts (and their pairs, in the
        columns this run reads; labels there are ignored)."""
        from .data import input_options, is_dataset, read_examples

        if is_dataset(texts):
            if pairs is not None:
                raise ConfigError("pairs=: a tf.data.Dataset carries its own second texts")
            options = input_options(self.data_config.read_options(), {}, texts)
            data = read_examples(texts, **{**options, "label_column": None, "label_columns": None,
                                           "label_delimiter": None, "label_names": None, "require_labels": False})
            texts, pairs = data.texts, data.pairs
            if pairs is None and self.data_config.pair_column is not None:
                raise ConfigError(f"this run classifies pairs, but the dataset has no second texts: give elements "
                                  f"(text, pair, label) or a dict with a {self.data_config.pair_column!r} column")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise ConfigError(f"got {len(texts)} texts but {len(pairs)} pairs")
        if not texts:
            return np.zeros((0, len(self.labels)), "float32")
        return self.predict_features(self.encode(texts, pairs))

    def decide(self, probs: np.ndarray) -> list:
        """Label names: one per row, or a list per row for multi-label."""
        if self.multilabel:
            thresholds = self.thresholds if self.thresholds is not None else 0.5
            return [[self.labels[j] for j in np.flatnonzero(p >= thresholds)] for p in probs]
        return [self.labels[j] for j in probs.argmax(axis=1)]

    def predict(self, texts, pairs=None) -> list[dict]:
        """[{"label": name (or list of names for multi-label), "probabilities": {name: p}}] per text."""
        probs = self.predict_proba(texts, pairs)
        return [{"label": label, "probabilities": {n: float(p) for n, p in zip(self.labels, row)}}
                for label, row in zip(self.decide(probs), probs)]

    def evaluate(self, data, **read_options) -> dict:
        """Metrics (see bertfit.evaluation) on a data file, a DataFrame, a dict of columns, a tf.data.Dataset
        or an Examples object."""
        from .data import Examples, LabelVocab, input_options, read_examples
        from .evaluation import classification_metrics

        if not isinstance(data, Examples):
            data = read_examples(data, **input_options(self.data_config.read_options(), read_options, data))
        vocab = LabelVocab(self.labels, self.multilabel)
        y_true = vocab.encode(data.labels, source=data)
        probs = self.predict_proba(data.texts, data.pairs)
        return classification_metrics(y_true, probs, self.labels, multilabel=self.multilabel,
                                      thresholds=self.thresholds)

    # -- persistence -------------------------------------------------------------------

    def config_dict(self) -> dict:
        return {
            "encoder": self.encoder_config.to_dict(),
            "lower_case": bool(self.tokenizer.lower_case),
            "labels": self.labels,
            "multilabel": self.multilabel,
            "thresholds": None if self.thresholds is None else [float(t) for t in self.thresholds],
            "data": self.data_config.read_options(),
            "train": dataclasses.asdict(self.train_config),
        }

    def weights(self) -> dict[str, np.ndarray]:
        w = self.model.encoder.get_canonical_weights()
        w["classifier/kernel"] = np.asarray(self.model.classifier.kernel.numpy())
        w["classifier/bias"] = np.asarray(self.model.classifier.bias.numpy())
        return w

    def save(self, directory, extra_state: dict | None = None) -> Path:
        """Write the run folder's model files; run.json last."""
        from safetensors.numpy import save_file

        from .checkpoints._common import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "weights.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v, dtype="float32") for k, v in self.weights().items()}, tmp)
        write_atomic(directory / "vocab.txt", "\n".join(self.tokenizer.vocab) + "\n")
        write_atomic(directory / "config.yaml", dump_yaml(self.config_dict()))
        write_atomic(directory / "run.json", json.dumps({"state": "complete", **(extra_state or {})}, indent=2))
        return directory


def load(run_dir) -> Classifier:
    """Load a finished run folder written by `bertfit train` or `Classifier.save`."""
    from .checkpoints import load_pretrained
    from .modeling import BertClassifier

    config = read_run_config(run_dir)
    pretrained = load_pretrained(str(run_dir))
    labels = config["labels"]
    model = BertClassifier(pretrained.encoder, len(labels), pooling=config.get("train", {}).get("pooling", "cls"))
    model(_dummy())
    head = pretrained.head
    model.set_head_weights(np.asarray(head["kernel"]), np.asarray(head["bias"]))
    return Classifier(model, pretrained.tokenizer, labels, multilabel=config.get("multilabel", False),
                      thresholds=config.get("thresholds"),
                      train_config=TrainConfig.from_dict(config.get("train", {})),
                      data_config=DataConfig.from_dict(config.get("data", {})))


def read_run_config(run_dir) -> dict:
    """The config.yaml of a finished run folder, checked to be one (no TensorFlow: the CLI asks first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BertfitError(f"{run_dir}: {'a file, not a' if run_dir.exists() else 'no such'} run folder")
    state_file = run_dir / "run.json"
    if not state_file.exists() and not (run_dir / "config.yaml").exists():
        hint = (f": it holds a model checkpoint, to fine-tune with {option('model')} (or bertfit.load_pretrained)"
                if (run_dir / "config.json").exists() or (run_dir / "bert_config.json").exists() else "")
        raise BertfitError(f"{run_dir}: not a bertfit run folder (no run.json or config.yaml from `bertfit train`)"
                           + hint)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("state") != "complete":
        raise BertfitError(f"{run_dir}: the run is incomplete (training did not finish); "
                           f"continue it with `bertfit train --out {run_dir} --resume`")
    config = read_yaml_mapping(run_dir / "config.yaml", BertfitError)
    if not isinstance(config.get("labels"), list):
        raise BertfitError(f"{run_dir / 'config.yaml'}: no 'labels' list: not a config.yaml that bertfit wrote")
    return config


def _dummy():
    from .modeling import dummy_inputs

    return dummy_inputs()
