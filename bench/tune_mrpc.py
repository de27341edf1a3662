"""Does tuning pay? MRPC dev F1 (paraphrase class) of the default recipe vs `bertfit tune`.

    .venv/bin/python bench/tune_mrpc.py                      # 20 trials, MiniLM-L6, max_length 128
    .venv/bin/python bench/tune_mrpc.py --trials 6 --timeout 3000
    .venv/bin/python bench/tune_mrpc.py --model TINY_DIR --limit 200 --trials 2   # a smoke run

`bertfit.tuning.tune` on MRPC train/dev with the default search space and tuning metric
`f1_positive` (F1 of class "1", the paraphrases: GLUE's MRPC F1), then its final run. The study
starts with START_POINTS: first the default recipe (lr 5e-5, batch 32, 3 epochs, warmup 0.1,
weight decay 0.01, dropout 0.1), so trial 0 *is* the default run (same split, seed and epoch
choice), then settings that suit small encoders (higher learning rates, more epochs), then random
restarts of the default recipe (the seed is in the search space); TPE takes over after them. Points
added to START_POINTS later are tried first when the study continues.

The tuned number is chosen on dev, so it is optimistic as an estimate of unseen data (no test
labels are used here). Prints a table and writes OUT/bench.json (default runs/tune-mrpc); the study
(OUT/study.db) continues when the command is run again. Long on a 2-core CPU: a MiniLM-L6 trial
takes roughly 5-15 minutes there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MRPC = HERE.parents[1] / "shared" / "data" / "mrpc"
COLUMNS = dict(text_column="#1 String", pair_column="#2 String", label_column="Quality")
DEFAULT_RECIPE = {"learning_rate": 5e-5, "batch_size": 32, "epochs": 3, "warmup_ratio": 0.1, "weight_decay": 0.01,
                  "dropout": 0.1}
START_POINTS = [DEFAULT_RECIPE,
                {**DEFAULT_RECIPE, "learning_rate": 1e-4, "epochs": 4},
                {**DEFAULT_RECIPE, "learning_rate": 8e-5, "batch_size": 16, "epochs": 4},
                # Added in a later session: the default's F1 still rose at its last epoch (0.820, 0.860, 0.871).
                {**DEFAULT_RECIPE, "epochs": 5},
                {**DEFAULT_RECIPE, "learning_rate": 3e-5, "batch_size": 16, "epochs": 5},
                # Then: 5 epochs peaked lower than 3, so the default's length with twice the steps.
                {**DEFAULT_RECIPE, "batch_size": 16},
                # Then: six settings within ~seed noise of each other, so the BERT paper's remedy for
                # small data sets: random restarts (other seeds) of the default recipe, best kept on dev.
                *({**DEFAULT_RECIPE, "seed": seed} for seed in (1, 2, 3, 4))]
# The default search space plus the seed (head initialisation, dropout masks, data order); the default
# recipe, and trials 0-6, ran with seed 0. From trial 11 on, also layer-wise learning-rate decay and the
# pooling (trials 0-10 ran without decay and with [CLS] pooling).
SEEDS = {"type": "categorical", "choices": list(range(10))}
EXTRA_SPACE = {"seed": SEEDS,
               "layerwise_lr_decay": {"type": "float", "low": 0.7, "high": 1.0},
               "pooling": {"type": "categorical", "choices": ["cls", "mean"]}}


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="trials to run (in this process)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--out", default="runs/tune-mrpc", help="tuning folder (study, final run, bench.json)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in --out)")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples (smoke runs)")
    args = p.parse_args(argv)

    from bertfit import tuning
    from bertfit.data import read_examples

    out = Path(args.out)
    train = read_examples(MRPC / "train.tsv", **COLUMNS)
    dev = read_examples(MRPC / "dev.tsv", **COLUMNS)
    if args.limit:
        train = train.subset(range(min(args.limit, len(train))))
    common = dict(model=args.model, max_length=args.max_length, export=False, **COLUMNS)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    space = {**tuning.DEFAULT_SEARCH_SPACE, **EXTRA_SPACE}
    tuned_clf = tuning.tune(train, dev, trials=args.trials, timeout=args.timeout, storage=args.storage, out=out,
                            metric="f1_positive", search_space=space, start_points=START_POINTS, log=log, **common)
    summary = tuned_clf.tuning
    first = next((t for t in summary["trials"] if t["params"] == DEFAULT_RECIPE and t["value"] is not None), None)
    if first is None:
        raise SystemExit("the default recipe's trial did not complete: no default figure to compare with")
    default = {"f1": first["value"], "trial": first["number"], "seconds": first["seconds"],
               "best_epoch": first["best_epoch"]}
    tuned = {"f1": tuned_clf.metrics["per_class"]["1"]["f1"], "accuracy": tuned_clf.metrics["accuracy"],
             "seconds": round(time.perf_counter() - t0, 1), "best_params": summary["best_params"],
             "trials": summary["n_trials"], "states": summary["states"]}

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": "python bench/tune_mrpc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "max_length": args.max_length, "train_examples": len(train),
        "dev_examples": len(dev), "default": default, "tuned": tuned,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in tuned["best_params"].items())
    print(f"MRPC dev, {args.model}, max_length {args.max_length}, {len(train)} training examples")
    print(f"{'':30}{'F1 (class 1)':>14}{'seconds':>10}")
    print(f"{'default recipe (trial ' + str(default['trial']) + ')':30}{default['f1']:>14.4f}{default['seconds']:>10.0f}")
    study_seconds = sum(t["seconds"] or 0 for t in summary["trials"])
    print(f"{'tuned (final run)':30}{tuned['f1']:>14.4f}{tuned['seconds']:>10.0f}  (accuracy {tuned['accuracy']:.4f}, "
          f"time = this command: its trials + the final run; all trials of the study: {study_seconds:.0f} s)")
    for t in summary["trials"]:
        print(f"  trial {t['number']}: {t['state'].lower():8} F1 {t['value'] if t['value'] is not None else float('nan'):.4f} "
              f"{t['seconds'] or 0:6.0f} s  {t['params']}")
    print(f"trials in the study: {tuned['trials']} ({', '.join(f'{n} {s.lower()}' for s, n in tuned['states'].items())});"
          f" best: {params}")
    print(f"report: {out / 'tuning.html'}")


if __name__ == "__main__":
    main()
