"""bertfit: fine-tune BERT-family encoders for text classification with TensorFlow.

    import bertfit
    clf = bertfit.fine_tune("train.tsv", text="sentence", label="label", out="runs/sst2")
    clf.predict(["a gripping, beautifully shot film"])
    clf = bertfit.load("runs/sst2")

Keras parts, for a model of your own (see bertfit.layers):

    x = bertfit.layers.Encoder("minilm-l6")(bertfit.layers.Preprocessor("minilm-l6")(text))["pooled_output"]
    model.compile(optimizer=bertfit.optimizer(total_steps=...), ...)
"""

import os

__version__ = "0.1.0"

# TensorFlow CPU settings (bench/RESULTS.md, session-9 levers); set them yourself to opt out.
# - oneDNN's kernels: 1.13x a training step and an inference batch at L=128 on an AVX2 CPU, where
#   TensorFlow leaves them off unless asked. Read when TensorFlow is imported: import bertfit first.
# - A pooled (BFC) CPU allocator, read at TensorFlow's first allocation, so it applies even when
#   TensorFlow was imported first: TF's plain allocator returns each large freed tensor to the OS and
#   the next op page-faults it in again (1.09x a training step; oneDNN's allocator pools already).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def load_pretrained(source, lower_case=None):
    """A pretrained encoder + tokenizer from any supported checkpoint (see bertfit.checkpoints)."""
    from .checkpoints import load_pretrained as _load

    return _load(source, lower_case=lower_case)


def fine_tune(train=None, validation=None, test=None, *, text=None, pair=None, label=None, model=None, out=None,
              overwrite=False, resume=False, config_file=None, log=print, on_epoch_end=None, callbacks=None,
              command=None, **options):
    """Fine-tune a BERT classifier and write a complete run folder; returns the Classifier.

    `train`, `validation`, `test`: a data file or folder (CSV, TSV, JSONL, Parquet, TFRecord, one folder
    per class), a DataFrame, a dict of columns or a tf.data.Dataset. Without `validation`, a stratified
    `validation_split` of `train` is held out; `test` is evaluated once, at the end.
    `text`, `pair`, `label`: the columns (text_column, pair_column, label_column). `model`: a name
    (minilm-l6), a checkpoint folder (Hugging Face, Google TF1, TF Hub SavedModel, a bertfit run).
    `out`: the run folder (None: write nothing); `overwrite` replaces a run there.
    Every other option is a keyword of this signature (DataConfig and TrainConfig's fields, the CLI's
    flags with underscores: epochs, learning_rate, batch_size, max_length, metric, ...); `config_file` is
    a YAML file of the same keys, which explicit options override.
    `on_epoch_end(epoch, validation_metrics)` is called after each epoch's evaluation (epoch counts from
    1); an exception it raises ends the run (tuning uses this to prune trials). Training runs
    `keras.Model.fit`; `callbacks` are Keras callbacks of your own, run after bertfit's, whose epoch logs
    hold `loss` and the validation metrics (`val_loss`, `val_accuracy`, ...). With several workers only
    the chief writes `out`.
    `out/source.json` records the data files (path, size, SHA-256) and `command` (the command line, if
    any). `resume=True` continues an interrupted run in `out`: with the recorded files when no data is
    given; refused when a file's content or a given option differs from the run's; a complete run is
    returned as it is.
    """
    from .training import fine_tune as _fine_tune

    return _fine_tune(train, validation, test, text=text, pair=pair, label=label, model=model, out=out,
                      overwrite=overwrite, resume=resume, config_file=config_file, log=log,
                      on_epoch_end=on_epoch_end, callbacks=callbacks, command=command, **options)


def _signatures():
    from .config import options_in_signature

    options_in_signature(fine_tune)


_signatures()


def load(run_dir):
    """A fine-tuned classifier from a run folder."""
    from .classifier import load as _load

    return _load(run_dir)


def optimizer(total_steps, learning_rate=5e-5, **options):
    """BERT's AdamW recipe for `model.compile`; see bertfit.training.optimizer."""
    from .training import optimizer as _optimizer

    return _optimizer(total_steps, learning_rate, **options)


def __getattr__(name):
    # `bertfit.layers` on first use: importing it imports TensorFlow and Keras.
    if name == "layers":
        import importlib

        return importlib.import_module(".layers", __name__)
    raise AttributeError(f"module 'bertfit' has no attribute {name!r}")
