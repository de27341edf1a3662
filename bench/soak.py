"""`bertfit serve` soaked with good and hostile requests at once: every good answer must be the model's,
every bad request must get its 4xx, slow and idle connections must be closed by the read timeout, and
the server's memory must stay flat after warm-up.

    .venv/bin/python bench/soak.py RUN             # a run folder (e.g. a MiniLM-L6 SST-2 run)
    .venv/bin/python bench/soak.py                 # no run: trains a tiny random BERT for a few seconds first

The load: --requests requests from --concurrency clients over keep-alive connections; --bad of them
(20 %) are bad, in turn: malformed JSON (400), text/plain (415), a foreign Host (403), an unknown
model (404), instances that are not texts (422), more texts than --max-instances (413) and a 20 KiB
header (431, connection closed). Good requests carry 1 to 8 SST-2 dev sentences; each answer is
compared with the in-process model (the same serving function) to 1e-5. Alongside, for the whole
soak: clients that send a request a byte at a time, that send a body 1,000 bytes shorter than its
Content-Length, that announce Content-Length 999999999999 (413 at once), and that connect and send
nothing (each kind on --hostiles connections at a time, a new one 0.1 s after the last closed): the
server must close each (after a 408, 413, or nothing for an idle one) within three read
timeouts plus 5 s. The anchor is the same server under the good
requests alone, in the same run: the table shows what the bad ones cost the good ones.

Pass: 0 wrong answers, 0 unexpected statuses, 0 5xx, every slow or idle connection closed, /healthz
answering after the soak, RSS growth over the soak (after the good-only anchor) under 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import percentile, sentences, start_server, tiny_run  # noqa: E402

NAME = "bench"
PATH = f"/v1/models/{NAME}:predict"


def rss_mb(pid) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bad_requests(max_instances):
    """(name, raw request bytes, expected status, the server closes the connection after it)."""

    def post(body, content_type="application/json", host="127.0.0.1", path=PATH, extra=""):
        body = body if isinstance(body, bytes) else body.encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    good = json.dumps({"instances": ["a fine film"]})
    return [
        ("malformed JSON", post('{"instances": ["a fine film"'), 400, False),
        ("text/plain", post(good, "text/plain"), 415, False),
        ("foreign Host", post(good, host="evil.example"), 403, False),
        ("unknown model", post(good, path="/v1/models/nope:predict"), 404, False),
        ("not texts", post(json.dumps({"instances": [1, 2]})), 422, False),
        ("too many texts", post(json.dumps({"instances": ["x"] * (max_instances + 1)})), 413, False),
        ("20 KiB header", post(good, extra=f"X-Big: {'a' * 20480}\r\n"), 431, True),
    ]


async def read_response(reader):
    """(status, body, closed): closed when the server said Connection: close."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed before answering")
    status, length, closed = int(line.split()[1]), 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            closed = True
    return status, await reader.readexactly(length), closed


async def connect(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def soak(port, jobs, concurrency, want, tally):
    """Send jobs (good: ("good", texts); bad: (name, raw, status, closes)) from `concurrency` clients."""
    queue = collections.deque(jobs)

    async def client():
        reader, writer = await connect(port)
        try:
            while queue:
                job = queue.popleft()
                t0 = time.perf_counter()
                if job[0] == "good":
                    body = json.dumps({"instances": job[1]}).encode()
                    writer.write((f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
                    status, answer, closed = await read_response(reader)
                    tally["latency"].append(time.perf_counter() - t0)
                    if status != 200:
                        tally["unexpected"].append(("good", status))
                    else:
                        got = json.loads(answer)["predictions"]
                        if len(got) != len(job[1]) or any(
                                abs(a - b) > 1e-5 for row, text in zip(got, job[1])
                                for a, b in zip(row["probabilities"], want[text])):
                            tally["wrong"] += 1
                    tally["good"] += 1
                else:
                    name, raw, expected, closes = job
                    writer.write(raw)
                    status, _, closed = await read_response(reader)
                    tally["bad"] += 1
                    if status != expected:
                        tally["unexpected"].append((name, status))
                    if status >= 500:
                        tally["5xx"] += 1
                if closed or (job[0] != "good" and job[3]):
                    writer.close()
                    reader, writer = await connect(port)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start


async def hostile(port, kind, stop, read_timeout, closed_after):
    """One slow or idle connection, repeated until `stop`: (seconds until the server closed it, the
    status it answered or None) for each; seconds inf when it stayed open past 3 read timeouts + 5 s."""
    while not stop.is_set():
        reader, writer = await connect(port)
        t0 = time.perf_counter()
        body = json.dumps({"instances": ["a fine film"]}).encode()
        request = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        answer, closed = [], False
        try:
            if kind == "byte at a time":
                for i in range(len(request)):
                    writer.write(request[i:i + 1])
                    await writer.drain()
                    if closed := await _closed(reader, 0.5, answer):
                        break
            elif kind in ("short body", "huge Content-Length"):
                length = len(body) + 1000 if kind == "short body" else 999999999999
                writer.write(request.replace(f"Content-Length: {len(body)}".encode(),
                                             f"Content-Length: {length}".encode()))
            deadline = t0 + read_timeout * 3 + 5
            while not closed and time.perf_counter() < deadline:
                closed = await _closed(reader, 0.5, answer)
            status = int(answer[0].split()[1]) if answer and answer[0].startswith(b"HTTP/") else None
            closed_after.append((time.perf_counter() - t0 if closed else float("inf"), status))
        except (ConnectionError, OSError):
            closed_after.append((time.perf_counter() - t0, None))
        finally:
            writer.close()
        await asyncio.sleep(0.1)  # paced: the load generator shares the cores with the server


async def _closed(reader, wait, answer) -> bool:
    """True once the server has closed, after any answer it sent (e.g. a 408, kept in `answer`)."""
    try:
        data = await asyncio.wait_for(reader.read(65536), wait)
    except asyncio.TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    while data:
        answer.append(data)
        data = await reader.read(65536)
    return True


def run_soak(port, jobs, concurrency, want, read_timeout, hostiles):
    tally = {"good": 0, "bad": 0, "wrong": 0, "5xx": 0, "unexpected": [], "latency": []}
    closed_after = {kind: [] for kind in ("byte at a time", "short body", "huge Content-Length", "idle")}

    async def main():
        stop = asyncio.Event()
        slow = [asyncio.create_task(hostile(port, kind, stop, read_timeout, closed_after[kind]))
                for kind in closed_after for _ in range(hostiles)]
        elapsed = await soak(port, jobs, concurrency, want, tally)
        stop.set()
        await asyncio.gather(*slow)
        return elapsed

    elapsed = asyncio.run(main())
    return elapsed, tally, closed_after


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="run folder (default: train a tiny one)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--bad", type=float, default=0.2, help="share of bad requests")
    p.add_argument("--hostiles", type=int, default=4, help="connections of each slow or idle kind, for the whole soak")
    p.add_argument("--read-timeout", type=float, default=2.0, help="the server's --read-timeout")
    p.add_argument("--max-instances", type=int, default=64, help="the server's --max-instances")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from bertfit.serving import Model

    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else tiny_run(Path(tmp.name))
    texts = sentences()
    model = Model(run)
    probs, _ = model([t.encode() for t in texts])
    want = {t: [float(x) for x in row] for t, row in zip(texts, probs)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rng = random.Random(args.seed)
    bad = bad_requests(args.max_instances)

    def good_job():
        return ("good", rng.sample(texts, rng.randint(1, 8)))

    n_bad = round(args.requests * args.bad)
    mixed = [good_job() for _ in range(args.requests - n_bad)] + [bad[i % len(bad)] for i in range(n_bad)]
    rng.shuffle(mixed)
    anchor_jobs = [good_job() for _ in range(args.requests - n_bad)]
    warm_jobs = [good_job() for _ in range(1000)]

    log = open(Path(tmp.name) / "server.log", "w+")
    server = start_server(run, port, 64, 5.0, log, extra=["--max-instances", str(args.max_instances),
                                                          "--read-timeout", str(args.read_timeout)])
    try:
        rss = {"started": rss_mb(server.pid)}
        run_soak(port, warm_jobs, args.concurrency, want, args.read_timeout, 0)
        rss["warmed up"] = rss_mb(server.pid)
        anchor_s, anchor, _ = run_soak(port, anchor_jobs, args.concurrency, want, args.read_timeout, 0)
        rss["after good-only"] = rss_mb(server.pid)
        soak_s, tally, closed_after = run_soak(port, mixed, args.concurrency, want, args.read_timeout,
                                               args.hostiles)
        rss["after the soak"] = rss_mb(server.pid)
        alive = asyncio.run(_healthz(port))
    finally:
        server.terminate()
        exit_code = server.wait(60)
    log.seek(0)
    tracebacks = log.read().count("Traceback")

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"\nbertfit serve soak: {run.resolve().name} ({model.backend}); {args.requests} requests at concurrency "
          f"{args.concurrency}, {args.bad:.0%} bad, {args.hostiles} connections of each slow kind; read timeout "
          f"{args.read_timeout:g} s, max instances {args.max_instances}")
    print(f"{datetime.date.today()}  {os.cpu_count()} vCPU {platform.machine()} ({cpu}), no GPU")
    print("| load | requests | good | bad | wrong answers | unexpected statuses | 5xx | good p50 ms | good p99 ms "
          "| good requests/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, t, seconds in (("good only (anchor)", anchor, anchor_s), ("good + bad + slow", tally, soak_s)):
        print(f"| {name} | {t['good'] + t['bad']} | {t['good']} | {t['bad']} | {t['wrong']} | {len(t['unexpected'])} "
              f"| {t['5xx']} | {1000 * percentile(t['latency'], 0.5):.1f} | {1000 * percentile(t['latency'], 0.99):.1f} "
              f"| {t['good'] / seconds:.1f} |")
    print("\n| slow or idle client | connections | closed by the server | slowest close s | answered |")
    print("|---|---:|---:|---:|---|")
    for kind, results in closed_after.items():
        finite = [t for t, _ in results if t != float("inf")]
        statuses = collections.Counter("closed, no answer" if s is None else str(s) for _, s in results)
        print(f"| {kind} | {len(results)} | {len(finite)} | {max(finite, default=float('nan')):.1f} | "
              f"{', '.join(f'{k} x{n}' for k, n in statuses.most_common())} |")
    print("\n| server RSS | MB |")
    print("|---|---:|")
    for when, mb in rss.items():
        print(f"| {when} | {mb:.0f} |")
    # Growth over the bad and slow load: from after the good-only anchor (by then 1,000 + the anchor's
    # requests have warmed the allocator and TensorFlow's caches) to after the soak.
    growth = (rss["after the soak"] - rss["after good-only"]) / rss["after good-only"]
    print(f"\n/healthz after the soak: {alive}; tracebacks in the server log: {tracebacks}; exit status on SIGTERM: "
          f"{exit_code}; RSS growth over the soak: {growth:+.1%}")
    if tally["unexpected"]:
        print("unexpected:", sorted(set(tally["unexpected"]))[:10])
    slow_ok = all(t != float("inf") for results in closed_after.values() for t, _ in results)
    ok = (tally["wrong"] == anchor["wrong"] == 0 and not tally["unexpected"] and not anchor["unexpected"]
          and tally["5xx"] == 0 and slow_ok and alive == 200 and growth < 0.10 and exit_code == 0)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


async def _healthz(port):
    reader, writer = await connect(port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, _ = await read_response(reader)
    writer.close()
    return status


if __name__ == "__main__":
    main()
