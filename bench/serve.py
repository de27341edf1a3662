"""`bertfit serve` under load: throughput and p50/p99 latency at concurrency 1, 8 and 64, side by side
with the same model called in process on batches of the same size (at most --max-batch).

    .venv/bin/python bench/serve.py RUN            # a run folder (e.g. a MiniLM-L6 SST-2 run)
    .venv/bin/python bench/serve.py                # no run: trains a tiny random BERT for a few seconds first

Each request is one SST-2 dev sentence (`{"instances": [sentence]}`), sent by a closed loop of C
clients over keep-alive connections (a minimal asyncio HTTP/1.1 client, so that the load generator
costs the 2 shared cores as little as possible). The server is `bertfit serve` in a subprocess with
its defaults (max batch 64, 5 ms batch timeout). In process, the same serving function
(`bertfit.serving.Model`, the run's SavedModel when it has one) classifies consecutive sentences in
batches of min(C, max batch), one after another; each text's latency is its batch's time.

Rounds alternate in-process and server measurements, and the table shows medians over rounds, so
that load from other processes on a shared machine hits both alike. The last column is the target:
server throughput at concurrency 64 >= 85 % of in-process batch throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
SST2_DEV = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"


def sentences() -> list[str]:
    if SST2_DEV.exists():
        with open(SST2_DEV, encoding="utf-8") as f:
            return [row[0] for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    import random

    rng = random.Random(0)
    words = "the a film movie plot actor scene story was is and it this very quite good bad dull".split()
    return [" ".join(rng.choices(words, k=rng.randint(3, 30))) for _ in range(872)]


def tiny_run(folder: Path) -> Path:
    """A tiny random BERT (real vocabulary) fine-tuned for one epoch on generated data."""
    import random

    import bertfit  # before Keras and TensorFlow: it sets TF's CPU options
    import keras

    from bertfit.checkpoints import default_model_path, write_huggingface
    from bertfit.checkpoints._common import read_vocab
    from bertfit.config import EncoderConfig
    from bertfit.modeling import build_encoder

    keras.utils.set_random_seed(0)
    config = EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=128)
    write_huggingface(folder / "tiny-bert", config, build_encoder(config).get_canonical_weights(),
                      read_vocab(default_model_path() / "vocab.txt"), lower_case=True)
    rng = random.Random(0)
    filler = "the a film movie plot actor scene story was is and it this very quite".split()
    rows = [(" ".join(rng.sample(filler, 6) + [rng.choice(["good", "great"] if i % 2 else ["bad", "awful"])]),
             "pos" if i % 2 else "neg") for i in range(400)]
    train = folder / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    bertfit.fine_tune(str(train), model=str(folder / "tiny-bert"), out=folder / "tiny-run", epochs=1,
                      max_length=128, log=lambda m: None)
    return folder / "tiny-run"


# --- in process ----------------------------------------------------------------------------


def in_process(model, texts, batch, seconds):
    """(texts/s, per-text latencies) classifying consecutive texts in batches, for about `seconds`."""
    latencies, done, i = [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [t.encode() for t in texts[i:i + batch]] or [texts[0].encode()]
        i = (i + batch) % len(texts)
        t0 = time.perf_counter()
        model(chunk)
        latencies += [time.perf_counter() - t0] * len(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - start), latencies


# --- over HTTP -------------------------------------------------------------------------------


async def client(port, path, bodies, offset, stop_at, latencies, errors):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += 1
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            t0 = time.perf_counter()
            writer.write(head + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


def over_http(port, name, texts, concurrency, seconds):
    bodies = [json.dumps({"instances": [t]}).encode() for t in texts]
    latencies, errors = [], []

    async def main():
        stop_at = time.perf_counter() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(client(port, f"/v1/models/{name}:predict", bodies, k * len(bodies) // concurrency,
                                      stop_at, latencies, errors) for k in range(concurrency)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. status {errors[0]}")
    return len(latencies) / elapsed, latencies


def start_server(run, port, max_batch, timeout_ms, log, extra=()):
    proc = subprocess.Popen([sys.executable, "-m", "bertfit.cli", "serve", str(run), "--port", str(port),
                             "--model-name", "bench", "--max-batch", str(max_batch),
                             "--batch-timeout-ms", str(timeout_ms), *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}; see {log.name}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                if b" 200 " in s.recv(1024):
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="run folder (default: train a tiny one)")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating in-process/server rounds; medians shown")
    args = p.parse_args()

    from bertfit.serving import Model

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else tiny_run(Path(tmp.name))
    texts = sentences()
    model = Model(run)
    model.warm_up()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tmp.name) / "server.log", "w")
    levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    server = start_server(run, port, args.max_batch, args.batch_timeout_ms, log)
    try:
        # the server answers what the model says
        sample = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/bench:predict", data=json.dumps({"instances": texts[:8]}).encode(),
            headers={"Content-Type": "application/json"})).read())
        want, _ = model([t.encode() for t in texts[:8]])
        assert max(abs(a - b) for row, w in zip(sample["predictions"], want)
                   for a, b in zip(row["probabilities"], w)) < 1e-5
        over_http(port, "bench", texts, max(levels), 2.0)  # warm-up
        results = {c: {"proc": [], "http": []} for c in levels}
        for r in range(args.rounds):
            for c in levels:
                batch = min(c, args.max_batch)
                results[c]["proc"].append(in_process(model, texts, batch, args.seconds))
                results[c]["http"].append(over_http(port, "bench", texts, c, args.seconds))
                print(f"round {r + 1}/{args.rounds} concurrency {c}: in process {results[c]['proc'][-1][0]:.1f}/s, "
                      f"server {results[c]['http'][-1][0]:.1f}/s", file=sys.stderr, flush=True)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        server.terminate()
        server.wait(60)
    load_after = os.getloadavg()

    def summary(runs):
        rate = statistics.median(r for r, _ in runs)
        lat = [x for _, ls in runs for x in ls]
        return rate, 1000 * percentile(lat, 0.5), 1000 * percentile(lat, 0.99)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nbertfit serve vs in process: {run.resolve().name} ({model.backend}); {len(texts)} SST-2 dev sentences, "
          f"one per request")
    print(f"{datetime.date.today()}  {os.cpu_count()} vCPU {platform.machine()} ({cpu}), no GPU; "
          f"max batch {args.max_batch}, batch timeout {args.batch_timeout_ms:g} ms; {args.rounds} rounds x "
          f"{args.seconds:g} s, medians; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"| concurrency | server texts/s | p50 ms | p99 ms | in-process batch | texts/s | p50 ms | p99 ms "
          f"| server / in-process |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        hr, h50, h99 = summary(results[c]["http"])
        pr, p50, p99 = summary(results[c]["proc"])
        print(f"| {c} | {hr:.1f} | {h50:.1f} | {h99:.1f} | {min(c, args.max_batch)} | {pr:.1f} | {p50:.1f} | "
              f"{p99:.1f} | {100 * hr / pr:.0f} % |")
    sizes = {k: float(v) for k, v in (line.rsplit(" ", 1) for line in metrics.splitlines()
                                       if line.startswith("bertfit_batch_size_"))}
    count = sizes.get("bertfit_batch_size_count", 0)
    if count:
        print(f"server batches: {int(count)}, mean size {sizes['bertfit_batch_size_sum'] / count:.1f}")


if __name__ == "__main__":
    main()
