"""TFLite float vs dynamic-range int8: accuracy on SST-2 dev and speed, beside the TensorFlow model.

    .venv/bin/python bench/tflite.py RUN [--data ../shared/data/sst2/dev.tsv] [--batch-size 32] [--repeats 5]

RUN is a trained run folder (SST-2 for the default data). The TFLite models are exported to a
temporary folder (the run folder is not touched), with the tokenizer inside, and run by the TFLite
interpreter with tensorflow-text's ops. Every backend classifies the same raw sentences in the same
batches (--batch-size, in file order); speed is examples per second, the median of --repeats passes
over the whole file after one warm-up pass, passes of the backends taking turns. Target: int8 accuracy at most 1 point below float.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]


def timed(backends, rows, batch_size, repeats):
    """{name: (probabilities from the warm-up pass, median examples/s)}. Passes alternate between
    backends (one pass of each per repeat), so that load from other processes hits all alike."""
    import numpy as np

    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    probs = {name: np.concatenate([fn(b) for b in batches]) for name, (fn, _) in backends.items()}  # warm-up
    rates = {name: [] for name in backends}
    for _ in range(repeats):
        for name, (fn, _) in backends.items():
            start = time.perf_counter()
            for b in batches:
                fn(b)
            rates[name].append(len(rows) / (time.perf_counter() - start))
    return {name: (probs[name], statistics.median(rates[name])) for name in backends}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="TFLite interpreter threads")
    args = p.parse_args()

    import numpy as np

    import bertfit  # before TensorFlow: it sets TF's CPU options
    import tensorflow as tf

    from bertfit.data import LabelVocab, read_examples
    from bertfit.export import export_tflite, tflite_interpreter

    clf = bertfit.load(args.run)
    if clf.multilabel:
        raise SystemExit("this benchmark reports single-label accuracy; the run is multi-label")
    data = read_examples(args.data, **{**clf.data_config.read_options()})
    y = np.asarray(LabelVocab(clf.labels, False).encode(data.labels, source=data.source))
    texts, pairs = list(data.texts), (list(data.pairs) if data.pairs is not None else None)
    print(f"{args.data}: {len(texts)} examples; run {args.run} ({len(clf.labels)} labels, "
          f"max_length {clf.train_config.max_length})", file=sys.stderr)

    backends = {}  # name -> (predict function on a batch of indices, size in bytes or None)
    idx = list(range(len(texts)))

    def batch_args(rows):
        return [texts[i] for i in rows], (None if pairs is None else [pairs[i] for i in rows])

    backends["Keras, in process (Classifier.predict_proba)"] = (
        lambda rows: clf.predict_proba(*batch_args(rows)), None)
    saved = Path(args.run) / "saved_model"
    if (saved / "saved_model.pb").exists():
        import tensorflow_text  # noqa: F401

        signature = tf.saved_model.load(str(saved)).signatures["serving_default"]

        def run_saved(rows):
            a, b = batch_args(rows)
            inputs = {"text": tf.constant(a)} | ({} if b is None else {"text_pair": tf.constant(b)})
            return signature(**inputs)["probabilities"].numpy()

        backends["TF SavedModel (serving_default)"] = (run_saved, sum(f.stat().st_size for f in saved.rglob("*")
                                                                     if f.is_file()))
    tmp = tempfile.TemporaryDirectory()
    for quantize, name in ((None, "TFLite float32"), ("int8", "TFLite int8 (dynamic range)")):
        started = time.perf_counter()
        path = export_tflite(clf, Path(tmp.name) / f"model.{quantize or 'float'}.tflite", quantize=quantize,
                             pairs=pairs is not None)
        print(f"exported {name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        runner = tflite_interpreter(path, num_threads=args.threads).get_signature_runner("serving_default")

        def run_tflite(rows, runner=runner):
            a, b = batch_args(rows)
            inputs = {"text": np.array(a, dtype=object)}
            if b is not None:
                inputs["text_pair"] = np.array(b, dtype=object)
            return runner(**inputs)["probabilities"]

        backends[name] = (run_tflite, path.stat().st_size)

    timings = timed(backends, idx, args.batch_size, args.repeats)
    results = {name: (*timings[name], size) for name, (_, size) in backends.items()}

    reference = results["TFLite float32"][0].argmax(1)
    keras_probs = results["Keras, in process (Classifier.predict_proba)"][0]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nTFLite vs TensorFlow: {Path(args.run).resolve().name} on {Path(args.data).name} "
          f"({len(texts)} examples), batch {args.batch_size}, median of {args.repeats} passes")
    print(f"{datetime.date.today()}  {os.cpu_count()} vCPU {platform.machine()} ({cpu}), no GPU; "
          f"TFLite threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    print("| model | accuracy | vs float TFLite | same label as float | max |p - p_keras| | ex/s | size MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    float_acc = float((reference == y).mean())
    for name, (probs, rate, size) in results.items():
        acc = float((probs.argmax(1) == y).mean())
        print(f"| {name} | {100 * acc:.2f} | {100 * (acc - float_acc):+.2f} | "
              f"{100 * float((probs.argmax(1) == reference).mean()):.1f} % | {np.abs(probs - keras_probs).max():.1e} | "
              f"{rate:.1f} | {'' if size is None else f'{size / 2**20:.1f}'} |")


if __name__ == "__main__":
    main()
