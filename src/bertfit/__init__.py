"""bertfit: fine-tune BERT-family encoders for text classification with TensorFlow.

    import bertfit
    clf = bertfit.fine_tune("train.tsv", text="sentence", label="label", out="runs/sst2")
    clf.predict(["a gripping, beautifully shot film"])
    clf = bertfit.load("runs/sst2")
"""

import os

__version__ = "0.1.0"

# TensorFlow's default CPU allocator returns each large tensor's memory to the OS when it is freed,
# so the next op page-faults it in again (about 4x the cost of a Square over a [4096, 1536] tensor).
# Its pooled (BFC) allocator keeps the memory: 1.06x a training step at L=128 (bench/levers.py
# --settings default,bfc). TensorFlow reads this when it first allocates; set it to false to opt out.
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
