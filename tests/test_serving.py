"""`bertfit serve`: TF Serving's REST API on a real socket, dynamic batching under load, bad requests,
graceful SIGTERM; and `bertfit predict --input` streaming a large file."""

import asyncio
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bertfit
from conftest import EDGE_TEXTS, LABELS, random_run, sentiment_rows

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    return random_run(tiny_model, tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def clf(run_dir):
    return bertfit.load(run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, run, *args, name="tiny"):
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(run).parent / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bertfit.cli", "serve", str(run), "--port", str(self.port), "--model-name", name,
             *args], stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not come up in 180 s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server(run_dir):
    s = ServerProcess(run_dir)
    try:
        yield s
    finally:
        s.stop()


def predict_url(server, name=None):
    return f"{server.url}/v1/models/{name or server.name}:predict"


# --- the API, endpoint by endpoint -----------------------------------------------------------


def test_start_message_has_url_name_and_curl(server):
    out = server.output()
    assert f"http://127.0.0.1:{server.port}/v1/models/tiny" in out
    assert "'tiny'" in out and "curl -s -X POST" in out and ":predict" in out


def test_predict_row_and_column_forms(server, clf):
    texts = ["a great film", "an awful plot, truly dreadful", ""]
    want = clf.predict_proba(texts)
    labels = [LABELS[i] for i in want.argmax(1)]

    r = httpx.post(predict_url(server), json={"instances": texts}).json()
    np.testing.assert_allclose([p["probabilities"] for p in r["predictions"]], want, atol=1e-5)
    assert [p["label"] for p in r["predictions"]] == labels

    for body in ({"instances": [{"text": t} for t in texts]}, {"signature_name": "serving_default", "instances": texts}):
        got = httpx.post(predict_url(server), json=body).json()["predictions"]
        np.testing.assert_allclose([p["probabilities"] for p in got], want, atol=1e-5)

    for body in ({"inputs": texts}, {"inputs": {"text": texts}}):
        out = httpx.post(predict_url(server), json=body).json()["outputs"]
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)
        assert out["label"] == labels

    versioned = f"{server.url}/v1/models/tiny/versions/1:predict"
    got = httpx.post(versioned, json={"instances": texts}).json()["predictions"]
    np.testing.assert_allclose([p["probabilities"] for p in got], want, atol=1e-5)


def test_classify(server, clf):
    texts = ["a great film", "dull"]
    want = clf.predict_proba(texts)
    r = httpx.post(f"{server.url}/v1/models/tiny:classify", json={"examples": [{"text": t} for t in texts]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [[name for name, _ in row] for row in results] == [LABELS, LABELS]
    np.testing.assert_allclose([[score for _, score in row] for row in results], want, atol=1e-5)
    # context features apply to every example, as in TF Serving
    r = httpx.post(f"{server.url}/v1/models/tiny:classify", json={"context": {"text": "dull"}, "examples": [{}]})
    np.testing.assert_allclose([s for _, s in r.json()["results"][0]], want[1], atol=1e-5)


def test_status_metadata_health(server):
    status = httpx.get(f"{server.url}/v1/models/tiny").json()
    assert status == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert httpx.get(f"{server.url}/v1/models/tiny/versions/1").status_code == 200
    meta = httpx.get(f"{server.url}/v1/models/tiny/metadata").json()
    assert meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"]["text"]["dtype"] == "DT_STRING" and list(sig["inputs"]) == ["text"]
    assert [d["size"] for d in sig["outputs"]["probabilities"]["tensor_shape"]["dim"]] == ["-1", "3"]
    assert sig["outputs"]["label"]["dtype"] == "DT_STRING"
    assert meta["bertfit"]["labels"] == LABELS and meta["bertfit"]["max_length"] == 32
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


# (method, path suffix or full path, body, headers, expected status, words expected in the error)
JSON = {"content-type": "application/json"}
MALFORMED = [
    ("POST", None, b'{"instances": ', JSON, 400, "not valid JSON"),
    ("POST", None, b'{"instances": ["caf\xe9"]}', JSON, 400, "not valid UTF-8"),
    ("POST", None, b"\xff\xfe\x00garbage", JSON, 400, "UTF-8"),
    ("POST", None, b"[1, 2]", JSON, 400, "must be a JSON object"),
    ("POST", None, b"", JSON, 400, "empty"),
    ("POST", None, b"{}", JSON, 400, "exactly one of"),
    ("POST", None, b'{"instances": ["a"], "inputs": ["b"]}', JSON, 400, "exactly one of"),
    ("POST", None, b'{"instance": ["a"]}', JSON, 400, "unknown field"),
    ("POST", None, b'{"signature_name": "other", "instances": ["a"]}', JSON, 400, "signature_name"),
    ("POST", None, b"[" * 200_000, JSON, 400, "nested too deeply"),
    ("POST", None, b'{"instances": []}', JSON, 422, "empty"),
    ("POST", None, b'{"instances": "a text"}', JSON, 422, "must be a list"),
    ("POST", None, b'{"instances": ["ok", 3]}', JSON, 422, "instances[1]: expected a string, got a number"),
    ("POST", None, b'{"instances": [null]}', JSON, 422, "got null"),
    ("POST", None, b'{"instances": [["nested"]]}', JSON, 422, "got a list"),
    ("POST", None, b'{"instances": [{"txt": "a"}]}', JSON, 422, "unknown input"),
    ("POST", None, b'{"instances": [{}]}', JSON, 422, "missing 'text'"),
    ("POST", None, b'{"instances": [{"text": "a", "text_pair": "b"}]}', JSON, 422, "unknown input(s) 'text_pair'"),
    ("POST", None, b'{"instances": ["\\ud800"]}', JSON, 422, "lone surrogate"),
    ("POST", None, b'{"inputs": {"text": "abc"}}', JSON, 422, "must be a list"),
    ("POST", None, b'{"inputs": []}', JSON, 422, "empty"),
    ("POST", None, b'{"inputs": 7}', JSON, 422, "list of strings"),
    ("POST", None, b'{"instances": ["a"]}', {"content-type": "application/xml"}, 415, "content type"),
    ("POST", None, b'{"instances": ["a"]}', {**JSON, "content-encoding": "gzip"}, 415, "content encoding"),
    # Bodies a web page can post cross-origin without a CORS preflight are refused.
    ("POST", None, b'{"instances": ["a"]}', {}, 415, "no content type: send JSON with the header Content-Type"),
    ("POST", None, b'{"instances": ["a"]}', {"content-type": "text/plain"}, 415, "Content-Type: application/json"),
    ("POST", None, b'{"instances": ["a"]}', {"content-type": "application/x-www-form-urlencoded"}, 415, "curl: -H"),
    ("POST", None, json.dumps({"instances": ["a"] * 1025}).encode(), JSON, 413, "1025 texts; the limit is 1024"),
    ("POST", None, json.dumps({"inputs": ["a"] * 1025}).encode(), JSON, 413, "--max-instances"),
    # A DNS-rebinding page's requests name its own host.
    ("POST", None, b'{"instances": ["a"]}', {**JSON, "host": "evil.example:8501"}, 403, "is not this server's name"),
    ("GET", "/v1/models/tiny/metadata", b"", {"host": "evil.example"}, 403, "'evil.example'"),
    ("POST", "/v1/models/nope:predict", b'{"instances": ["a"]}', JSON, 404, "no model named 'nope'"),
    ("POST", "/v1/models/tiny/versions/7:predict", b'{"instances": ["a"]}', JSON, 404, "no version '7'"),
    ("POST", "/v1/models/tiny:regress", b'{"instances": ["a"]}', JSON, 400, "classifier"),
    ("POST", "/v1/models/tiny:explode", b'{"instances": ["a"]}', JSON, 404, "unknown method"),
    ("GET", "/v1/models/tiny:predict", b"", JSON, 405, "use POST"),
    ("GET", "/no/such/path", b"", JSON, 404, "no such path"),
    ("POST", "/v1/models/tiny:classify", b'{"examples": ["a"]}', JSON, 422, "examples[0]"),
    ("POST", "/v1/models/tiny:classify", b'{"instances": ["a"]}', JSON, 400, "unknown field"),
]
OVERSIZED = ("POST", None, b'{"instances": ["' + b"x" * (11 * 1024 * 1024) + b'"]}', JSON, 413, "limit")


def valid_request(rng, pool):
    """A random valid request: (path, body, [(pool index, ...)], form)."""
    idx = [rng.randrange(len(pool)) for _ in range(rng.choice([1, 1, 1, 2, 3, 5]))]
    texts = [pool[i] for i in idx]
    form = rng.choice(["rows", "row-objects", "columns", "column-dict", "classify", "versioned"])
    path = "/v1/models/tiny:predict"
    if form == "rows":
        body = {"instances": texts}
    elif form == "row-objects":
        body = {"instances": [{"text": t} for t in texts]}
    elif form == "columns":
        body = {"inputs": texts}
    elif form == "column-dict":
        body = {"inputs": {"text": texts}}
    elif form == "classify":
        path, body = "/v1/models/tiny:classify", {"examples": [{"text": t} for t in texts]}
    else:
        path, body = "/v1/models/tiny/versions/1:predict", {"instances": texts}
    return path, json.dumps(body).encode(), idx, form


def probabilities_of(form, payload):
    if form == "classify":
        return [[score for _, score in row] for row in payload["results"]], None
    if form in ("columns", "column-dict"):
        return payload["outputs"]["probabilities"], payload["outputs"]["label"]
    return [p["probabilities"] for p in payload["predictions"]], [p["label"] for p in payload["predictions"]]


def send_all(port, jobs, concurrency, deadline_s):
    """Send every job from `concurrency` threads, each with its own keep-alive connection (http.client:
    a light client, so that the server rather than the client is what gets loaded).
    Returns (status, body) per job, in job order."""
    results = [None] * len(jobs)
    lock = threading.Lock()
    next_job = iter(range(len(jobs)))
    deadline = time.monotonic() + deadline_s
    errors = []

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(next_job, None)
                if i is None:
                    return
                method, path, body, headers, _ = jobs[i]
                conn.request(method, path, body=body if method == "POST" else None, headers=headers)
                response = conn.getresponse()
                results[i] = (response.status, response.read())
        except Exception as e:  # a connection error is a failure of the server
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 60))
    assert not errors, errors[:5]
    assert all(r is not None for r in results), "not all requests were answered in time"
    return results


def test_loopback_names_are_answered(server):
    from bertfit.serving import _host_name

    assert [_host_name(h) for h in ("[::1]:8501", "LOCALHOST:80", "127.0.0.1", "::1", "evil.example:1")] == \
        ["::1", "localhost", "127.0.0.1", "::1", "evil.example"]
    for host in (f"localhost:{server.port}", "127.0.0.1", f"[::1]:{server.port}"):
        r = httpx.post(predict_url(server), json={"instances": ["fine"]}, headers={"host": host})
        assert r.status_code == 200, (host, r.text)


def test_2000_requests_at_concurrency_32_mixing_valid_and_malformed(server, clf):
    rng = random.Random(7)
    pool = [t for t, _ in sentiment_rows(300, seed=5, classes=3)] + EDGE_TEXTS
    want = clf.predict_proba(pool)
    jobs = []  # (method, path, body, headers, expectation)
    for _ in range(2000):
        if rng.random() < 0.25:
            method, path, body, headers, status, words = rng.choice(MALFORMED)
            jobs.append((method, path or "/v1/models/tiny:predict", body, headers, ("error", status, words)))
        else:
            path, body, idx, form = valid_request(rng, pool)
            jobs.append(("POST", path, body, {"content-type": "application/json"}, ("ok", idx, form)))
    for k in (300, 900, 1500):  # a few bodies over the 10 MiB limit, drained and answered 413
        jobs[k] = ("POST", "/v1/models/tiny:predict", OVERSIZED[2], JSON, ("error", 413, "limit"))

    started = time.monotonic()
    results = send_all(server.port, jobs, concurrency=32, deadline_s=240)
    elapsed = time.monotonic() - started

    failures, valid = [], 0
    for (method, path, body, headers, expect), (status, content) in zip(jobs, results):
        if expect[0] == "ok":
            valid += 1
            if status != 200:
                failures.append(f"valid {path} {body[:80]!r} -> {status} {content[:200]!r}")
                continue
            probs, labels = probabilities_of(expect[2], json.loads(content))
            np.testing.assert_allclose(probs, want[expect[1]], atol=1e-5)
            if labels is not None:
                assert labels == [LABELS[j] for j in want[expect[1]].argmax(1)]
        else:
            _, want_status, words = expect
            payload = json.loads(content)
            if status != want_status or words not in payload.get("error", ""):
                failures.append(f"{method} {path} {body[:60]!r}: want {want_status} '{words}', got {status} {payload}")
    assert not failures, f"{len(failures)} wrong answers, e.g.:\n" + "\n".join(failures[:10])
    assert valid > 1400
    assert server.proc.poll() is None
    print(f"2000 requests at concurrency 32 in {elapsed:.1f} s")

    metrics = httpx.get(f"{server.url}/metrics").text
    batches = int(re.search(r"^bertfit_batch_size_count (\d+)$", metrics, re.M).group(1))
    texts = int(re.search(r"^bertfit_texts_total (\d+)$", metrics, re.M).group(1))
    assert batches < texts, "concurrent requests were never merged into one batch"


def test_huge_text_is_truncated_quickly(server, clf):
    text = "great movie, " * 80_000  # 1 MB: tokenized in the graph, then truncated to max_length
    rss_before = rss_mb(server.proc.pid)
    started = time.monotonic()
    r = httpx.post(predict_url(server), json={"instances": [text, "ok"]}, timeout=60)
    assert r.status_code == 200 and time.monotonic() - started < 10
    np.testing.assert_allclose([p["probabilities"] for p in r.json()["predictions"]],
                               clf.predict_proba([text, "ok"]), atol=1e-5)
    assert rss_mb(server.proc.pid) - rss_before < 300


def rss_mb(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_body_over_the_limit_gets_413_and_the_server_goes_on(server):
    r = httpx.post(predict_url(server), content=OVERSIZED[2], headers=JSON)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(11):
            yield b"x" * (1024 * 1024)

    r = httpx.post(predict_url(server), content=chunks(), headers=JSON)
    assert r.status_code == 413
    assert httpx.post(predict_url(server), json={"instances": ["fine"]}).status_code == 200


def test_metrics_are_prometheus_text(server):
    httpx.post(predict_url(server), json={"instances": ["x"]})
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? -?[0-9.e+Inf-]+$')
    types = {}
    for line in r.text.strip().splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            types[name] = kind
        elif not line.startswith("# HELP"):
            assert sample.match(line), line
    assert types["bertfit_requests_total"] == "counter"
    assert types["bertfit_request_duration_seconds"] == "histogram"
    assert types["bertfit_batch_size"] == "histogram"
    assert types["bertfit_requests_in_flight"] == "gauge"
    assert re.search(r'^bertfit_requests_total\{endpoint="predict",code="200"\} [1-9]', r.text, re.M)
    assert re.search(r'^bertfit_request_duration_seconds_bucket\{endpoint="predict",le="\+Inf"\} [1-9]', r.text, re.M)
    assert re.search(r"^bertfit_requests_in_flight 1$", r.text, re.M)  # this request


def _exchange(port, data: bytes, wait: float = 10.0, close_after_send=False) -> tuple[bytes, float]:
    """Send raw bytes; (everything the server sent until it closed, seconds until it closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    started, got = time.monotonic(), b""
    try:
        sock.sendall(data)
        if close_after_send:
            return b"", 0.0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got, time.monotonic() - started
            got += chunk
    finally:
        sock.close()


def test_slow_idle_oversized_and_vanishing_clients_are_cut_off(run_dir):
    """--read-timeout 2: idle and half-sent requests lose their connection (408 when part came), a head
    over 16 KiB gets 431, a Content-Length far over the limit 413 at once, and a client that leaves
    mid-body is not a traceback. While the model loads, connections are refused, not left hanging."""
    port = free_port()
    log = open(Path(run_dir).parent / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "bertfit.cli", "serve", str(run_dir), "--port", str(port),
                             "--model-name", "tiny", "--read-timeout", "2"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline, refused = time.monotonic() + 180, 0
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not come up"
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except ConnectionRefusedError:
                refused += 1
                time.sleep(0.05)
                continue
            with sock:  # accepted: answered at once, not after the model has loaded
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 200"), "an accepted connection waited for the model"
            break
        assert refused > 0

        got, seconds = _exchange(port, b"")  # idle: closed, nothing said
        assert got == b"" and 1.5 < seconds < 6, seconds
        got, seconds = _exchange(port, b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert got.startswith(b"HTTP/1.1 408") and b"head did not arrive within 2 s" in got and seconds < 6
        head = (b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n")
        got, seconds = _exchange(port, head % 100 + b'{"instances": ')  # the body stops coming
        assert got.startswith(b"HTTP/1.1 408") and b"--read-timeout" in got and seconds < 6, got
        got, seconds = _exchange(port, head % 999999999999 + b'{"instances": ["a"]}')
        assert got.startswith(b"HTTP/1.1 413") and seconds < 1.5, (got, seconds)
        big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        got, _ = _exchange(port, big)
        assert got.startswith(b"HTTP/1.1 431"), got[:100]
        _exchange(port, head % 1000 + b'{"instances": ["', close_after_send=True)  # gone mid-body
        # After a response, a keep-alive connection's next head has the same time limit.
        ok = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        got, seconds = _exchange(port, ok + b"GET /heal")
        assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got and 1.5 < seconds < 6, got

        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/tiny:predict", json={"instances": ["still fine"]})
        assert r.status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert re.search(r'^bertfit_requests_total\{endpoint="predict",code="499"\} 1$', metrics, re.M), metrics
    finally:
        proc.kill()
        proc.wait(30)
    log.seek(0)
    output = log.read()
    assert "Traceback" not in output and "Exception" not in output, output


def test_sigterm_finishes_in_flight_requests_then_exits_0(server, clf):
    """Last in this module: it stops the shared server."""
    texts = [f"request in flight {i} great" for i in range(6000)]  # ~100 batches: still running at SIGTERM
    parts = [texts[i:i + 1000] for i in range(0, len(texts), 1000)]  # --max-instances 1024
    box = {}

    def send(k):
        box[k] = httpx.post(predict_url(server), json={"instances": parts[k]}, timeout=120)

    senders = [threading.Thread(target=send, args=(k,)) for k in range(len(parts))]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the server has the requests (in flight: they + this one)
        metrics = httpx.get(f"{server.url}/metrics").text
        if int(re.search(r"^bertfit_requests_in_flight (\d+)$", metrics, re.M).group(1)) > len(parts):
            break
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no new connections once shutting down
        httpx.post(predict_url(server), json={"instances": ["late"]}, timeout=5)
    for sender in senders:
        sender.join(120)
    got = []
    for k in range(len(parts)):
        assert box[k].status_code == 200, box[k].text
        got += [p["probabilities"] for p in box[k].json()["predictions"]]
    assert len(got) == len(texts)
    np.testing.assert_allclose(got[::500], clf.predict_proba(texts[::500]), atol=1e-5)
    assert server.proc.wait(60) == 0, server.output()


# --- sentence pairs, with uvicorn in a thread (a real socket) -------------------------------------


def test_pair_model(run_dir):
    """The same weights, declared a sentence-pair model (served by the in-process serving function)."""
    import dataclasses

    import uvicorn

    from bertfit.serving import Model, build_app

    clf = bertfit.load(run_dir)
    clf.data_config = dataclasses.replace(clf.data_config, pair_column="b")
    model = Model(run_dir, name="pairs", clf=clf)
    assert model.backend == "in-process serving function"  # the run's SavedModel takes no text_pair
    assert model.inputs == ["text", "text_pair"]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(model), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        a, b = ["a great film", "dull", "ünï"], ["an awful one", "", "word " * 100]
        want = clf.predict_proba(a, b)
        rows = httpx.post(f"{url}/v1/models/pairs:predict",
                          json={"instances": [{"text": x, "text_pair": y} for x, y in zip(a, b)]}).json()
        np.testing.assert_allclose([p["probabilities"] for p in rows["predictions"]], want, atol=1e-5)
        cols = httpx.post(f"{url}/v1/models/pairs:predict", json={"inputs": {"text": a, "text_pair": b}}).json()
        np.testing.assert_allclose(cols["outputs"]["probabilities"], want, atol=1e-5)
        meta = httpx.get(f"{url}/v1/models/pairs/metadata").json()
        assert sorted(meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]) == \
            ["text", "text_pair"]
        for body, words in [({"instances": ["just a text"]}, "sentence-pair model"),
                            ({"instances": [{"text": "a"}]}, "missing 'text_pair'"),
                            ({"inputs": ["a"]}, "sentence-pair model"),
                            ({"inputs": {"text": ["a", "b"], "text_pair": ["c"]}}, "has 2 strings but"),
                            ({"inputs": {"text": ["a"]}}, "missing 'text_pair'")]:
            r = httpx.post(f"{url}/v1/models/pairs:predict", json=body)
            assert r.status_code == 422 and words in r.json()["error"], (body, r.text)
        r = httpx.post(f"{url}/v1/models/pairs:classify", json={"examples": [{"text": a[0], "text_pair": b[0]}]})
        np.testing.assert_allclose([s for _, s in r.json()["results"][0]], want[0], atol=1e-5)
    finally:
        server.should_exit = True
        thread.join(30)


def test_window_runs_are_served_through_the_classifier(run_dir):
    """long_text="window" averages windows, which the SavedModel does not: the server uses predict_proba."""
    import dataclasses

    from bertfit.serving import Model

    clf = bertfit.load(run_dir)
    clf.train_config = dataclasses.replace(clf.train_config, long_text="window", window_stride=8)
    model = Model(run_dir, clf=clf)
    assert model.backend == "classifier"
    texts = ["word " * 200 + "great", "short"]
    probs, labels = model([t.encode() for t in texts])
    np.testing.assert_allclose(probs, clf.predict_proba(texts), atol=1e-6)
    assert labels == [LABELS[i] for i in probs.argmax(1)]


def test_batcher_merges_requests_and_splits_big_ones():
    """The batcher alone: concurrent requests share batches of at most max_batch texts, in order."""
    from bertfit.serving import Batcher

    sizes = []

    def model(texts, pairs):
        sizes.append(len(texts))
        time.sleep(0.01)
        return np.array([[float(t.decode())] for t in texts], "float32"), [t.decode() for t in texts]

    batcher = Batcher(model, max_batch=8, timeout_s=0.5)
    batcher.start()

    async def main():
        requests = [[str(i * 100 + j).encode() for j in range(n)] for i, n in enumerate([1, 2, 3, 20, 1, 5, 8, 1])]
        for _ in requests:  # announced (being read): a batch waits for them, up to the timeout
            batcher.arrive()
        answers = await asyncio.gather(*(batcher.submit(r, None, arrived=True) for r in requests))
        for request, (probs, labels) in zip(requests, answers):
            assert labels == [t.decode() for t in request]
            assert probs[:, 0].tolist() == [float(t.decode()) for t in request]
        # a lone request, with nothing else arriving, does not wait for the timeout
        started = time.monotonic()
        await batcher.submit([b"7"], None)
        assert time.monotonic() - started < 0.4

    asyncio.run(main())
    batcher.stop(10)
    assert max(sizes) <= 8 and sum(sizes) == 42 and len(sizes) <= 8


# --- bertfit predict --input: streams a large file --------------------------------------------------


def test_predict_streams_a_large_file_in_order_with_bounded_memory(run_dir, clf, tmp_path, monkeypatch, capsys):
    """`bertfit predict RUN --input big.jsonl --output out.jsonl`, in process so that tracemalloc sees
    every Python allocation: the peak while streaming stays far below what holding all rows needs."""
    import tracemalloc

    import bertfit.predict
    from bertfit.cli import main

    rng = random.Random(3)
    base = [t for t, _ in sentiment_rows(500, seed=11, classes=3)]
    filler = " ".join(["lorem"] * 200)  # ~1.2 KB per row (the model truncates to 32 tokens)
    src, out = tmp_path / "big.jsonl", tmp_path / "out.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(20_000):
            f.write(json.dumps({"a": f"{base[i % len(base)]} {rng.choice(base)} row {i} {filler}"}) + "\n")
    input_mb = src.stat().st_size / 2**20

    original = bertfit.predict.predict_file

    at_start = {}

    def measured(*args, **kwargs):  # growth from here on: the streaming, not the model loading
        tracemalloc.reset_peak()
        at_start["mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        return original(*args, **kwargs)

    monkeypatch.setattr(bertfit.predict, "predict_file", measured)
    tracemalloc.start()
    try:
        code = main(["predict", str(run_dir), "--input", str(src), "--output", str(out)])
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20 - at_start["mb"]
    finally:
        tracemalloc.stop()
    assert code == 0
    assert "wrote 20000 predictions" in capsys.readouterr().err

    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20_000
    check = sorted(rng.sample(range(20_000), 300))  # the order is kept: rows all over the file
    rows = src.read_text(encoding="utf-8").splitlines()
    want = clf.predict_proba([json.loads(rows[i])["a"] for i in check])
    got = [json.loads(lines[i]) for i in check]
    np.testing.assert_allclose([[g["probabilities"][n] for n in LABELS] for g in got], want, atol=1e-5)
    assert [g["label"] for g in got] == [LABELS[j] for j in want.argmax(1)]
    # holding all rows would take more than the file itself; streaming holds one chunk of 4,096 rows
    print(f"predict: {input_mb:.1f} MB file, Python heap growth at most {peak_mb:.1f} MB")
    assert peak_mb < input_mb / 2, f"Python heap grew by {peak_mb:.1f} MB for a {input_mb:.1f} MB file"
