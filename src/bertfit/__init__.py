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


def fine_tune(train, validation=None, test=None, **options):
    """Fine-tune a classifier; see bertfit.training.fine_tune."""
    from .training import fine_tune as _fine_tune

    return _fine_tune(train, validation, test, **options)


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
