"""`bertfit serve RUN`: an HTTP server speaking TF Serving's REST API, with server-side dynamic batching.

Clients written for TF Serving work unchanged:

    POST /v1/models/NAME:predict                 {"instances": [...]} or {"inputs": ...}
    POST /v1/models/NAME/versions/1:predict
    POST /v1/models/NAME:classify                {"examples": [{"text": ...}, ...]}
    GET  /v1/models/NAME                         model_version_status
    GET  /v1/models/NAME/metadata                signature (inputs, outputs, dtypes, shapes) + label names
    GET  /healthz                                liveness
    GET  /metrics                                Prometheus text format

Responses are those TF Serving gives for the run's SavedModel (`serving_default`: `text`
[, `text_pair`] -> `probabilities`, `label`). Errors are `{"error": "..."}` with status 400
(the body is not a request: not UTF-8, not JSON, no `instances`/`inputs`), 422 (a well-formed
request the model cannot take: empty lists, non-strings, a missing `text_pair`), 404 (unknown
model, version or path), 405, 413 (body over `max_body_bytes`, or more than `max_instances` texts) or
415 (a content type other than JSON, or a content encoding). Bound to a loopback address, the server
answers only requests whose Host is a loopback name (403 otherwise: a DNS-rebinding page would
send its own). A request's head, and then its body, must each arrive within `read_timeout_s` (408 and
the connection closed; idle connections are closed then too), and a head over 16 KiB gets 431. A
bad request never affects other requests.

Concurrent requests are merged into model batches of up to `max_batch` texts; a batch starts
when it is full, when `batch_timeout_ms` have passed since its first text arrived, or at once
when no other prediction request is being read (nothing could join it). The model runs on one
worker thread (TensorFlow uses all cores inside it); the event loop only parses and answers.
The port is taken before the model loads but connections are accepted only once it has: until
then they are refused, not left waiting. On SIGTERM or Ctrl-C the server stops accepting
connections, answers every request it has taken, drains the batcher and exits with status 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .errors import BertfitError

SIGNATURE = "serving_default"
VERSION = "1"
# JSON only: the content types a web page can post cross-origin without a CORS preflight (text/plain,
# forms, none) are refused, so a page a user visits cannot make the server work for it.
JSON_TYPES = ("application/json", "text/json")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PARSE_IN_THREAD_BYTES = 64 * 1024  # larger bodies are parsed off the event loop
HEAD_LIMIT_BYTES = 16 * 1024  # a request's line and headers (h11's default): larger gets 431
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024  # an oversized body is read (and dropped) up to this, so the 413 arrives


class RequestError(Exception):
    """A bad request: answered with `{"error": message}` and `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- the model ----------------------------------------------------------------------------


class Model:
    """The served classifier: raw texts (and pairs) in, probabilities and label strings out.

    It runs the SavedModel's serving function (tokenizer and classifier in one TensorFlow
    graph, one call per batch): `RUN/saved_model` when the run has one (what TF Serving would
    serve), else the same function (`bertfit.export.ServingModule`) built in process. Measured
    on MiniLM-L6 (SST-2 sentences, examples per CPU-second; bench/serve.py has the setup): the
    loaded SavedModel 46 / 66 / 50 at batch 1 / 8 / 64, the in-process function 39 / 60 / 50,
    `Classifier.predict_proba` (tokenize, strip, re-pad, forward: several calls) 34 / 55 / 50.
    Runs that average windows over long texts (long_text="window") are served through
    `Classifier.predict_proba`, so that answers equal `bertfit predict` also for run folders whose
    SavedModel was exported by an older bertfit, whose SavedModel truncated instead.
    """

    def __init__(self, run, name: str | None = None, clf=None, use_saved_model: bool = True):
        from .classifier import load

        self.run = Path(run)
        self.clf = clf if clf is not None else load(run)
        self.name = name or self.run.resolve().name
        self.labels = list(self.clf.labels)
        self.multilabel = bool(self.clf.multilabel)
        self.pairs = self.clf.data_config.pair_column is not None
        self.inputs = ["text", "text_pair"] if self.pairs else ["text"]
        self.backend = "classifier"
        self._fn = None
        if self.clf.train_config.long_text != "window":
            self._fn = self._saved_model() if use_saved_model else None
            if self._fn is None:
                self._fn, self.backend = self._serving_function(), "in-process serving function"

    def _saved_model(self):
        """The run's exported `serving_default`, if there is one with this model's inputs."""
        import tensorflow as tf

        from .tokenization import _tf_text_ops

        _tf_text_ops()  # registers the export's two tokenizer ops (all it needs of tensorflow-text)
        path = self.run / "saved_model"
        if not (path / "saved_model.pb").exists():
            return None
        try:
            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        except Exception as e:  # a damaged export: serve from the weights instead
            print(f"bertfit serve: not using {path} ({type(e).__name__}: {e})", file=sys.stderr)
            return None
        if sorted(signature.structured_input_signature[1]) != sorted(self.inputs):
            return None
        self.backend = f"SavedModel {path}"
        if self.pairs:
            return lambda a, b: signature(text=a, text_pair=b)
        return lambda a: signature(text=a)

    def _serving_function(self):
        import tensorflow as tf

        from .export import ServingModule

        module = ServingModule(self.clf)
        spec = tf.TensorSpec([None], tf.string)
        if self.pairs:
            return tf.function(lambda a, b: module.classify(a, b), input_signature=[spec, spec], autograph=False)
        return tf.function(lambda a: module.classify(a), input_signature=[spec], autograph=False)

    def __call__(self, texts: list[bytes], pairs: list[bytes] | None = None):
        """(probabilities float32 [n, labels], label strings [n])."""
        if self._fn is None:
            decode = lambda xs: [x.decode("utf-8") for x in xs]  # noqa: E731
            probs = self.clf.predict_proba(decode(texts), None if pairs is None else decode(pairs))
            decided = self.clf.decide(probs)
            labels = [",".join(d) if self.multilabel else d for d in decided]
            return probs, labels
        import tensorflow as tf

        args = [tf.constant(texts, tf.string)] + ([] if pairs is None else [tf.constant(pairs, tf.string)])
        out = self._fn(*args)
        return out["probabilities"].numpy(), [x.decode("utf-8") for x in out["label"].numpy()]

    def warm_up(self):
        self([b"warm up"] * 2, [b"warm up"] * 2 if self.pairs else None)


# --- dynamic batching ---------------------------------------------------------------------


class _Job:
    __slots__ = ("texts", "pairs", "future", "loop", "queued")

    def __init__(self, texts, pairs, future, loop):
        self.texts, self.pairs, self.future, self.loop = texts, pairs, future, loop
        self.queued = time.perf_counter()


class Batcher:
    """Merges concurrent requests into model batches by size (`max_batch` texts) and wait time.

    `submit` (on the event loop) queues a request's texts as one or more jobs of at most
    `max_batch` texts and returns an awaitable. The worker thread takes the first waiting job,
    adds whole jobs until the batch is full or `timeout_s` has passed since it took the first,
    runs the model, and hands each job its rows back on its event loop. It waits only while
    requests are `arriving` (announced with `arrive()`, being read and parsed, not yet
    submitted): with none, nothing could join the batch, and waiting would only add latency.
    """

    def __init__(self, model, max_batch: int = 64, timeout_s: float = 0.005, metrics=None):
        if max_batch < 1:
            raise BertfitError(f"max_batch must be at least 1, got {max_batch}")
        if timeout_s < 0:
            raise BertfitError(f"batch timeout must be >= 0, got {timeout_s * 1000:g} ms")
        self.model, self.max_batch, self.timeout_s = model, max_batch, timeout_s
        self.metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._arriving = 0
        self._thread = threading.Thread(target=self._work, name="bertfit-batcher", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float | None = None):
        """Answer every queued job, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def queued_texts(self) -> int:
        return sum(len(j.texts) for j in list(self._jobs))

    def arrive(self):
        """A prediction request is being read: a batch being formed may wait for it."""
        with self._cond:
            self._arriving += 1

    def leave(self):
        """A request announced with `arrive()` will not be submitted (it was a bad request)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify()

    async def submit(self, texts: list[bytes], pairs: list[bytes] | None, arrived: bool = False):
        """Classify; `arrived`: this request was announced with `arrive()`."""
        loop = asyncio.get_running_loop()
        jobs = []
        for start in range(0, len(texts), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            jobs.append(_Job(texts[chunk], None if pairs is None else pairs[chunk], loop.create_future(), loop))
        with self._cond:
            if arrived:
                self._arriving -= 1
            if self._stopping:
                raise RequestError(503, "the server is shutting down")
            self._jobs.extend(jobs)
            self._cond.notify()
        parts = await asyncio.gather(*(j.future for j in jobs))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p for p, _ in parts]), [label for _, labels in parts for label in labels]

    def _take_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._jobs.popleft()]
            size = len(batch[0].texts)
            deadline = time.monotonic() + self.timeout_s
            while size < self.max_batch:
                if self._jobs:
                    if size + len(self._jobs[0].texts) > self.max_batch:
                        break  # a whole job does not fit: it starts the next batch
                    job = self._jobs.popleft()
                    batch.append(job)
                    size += len(job.texts)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping or self._arriving <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _work(self):
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            texts = [t for job in batch for t in job.texts]
            pairs = None if batch[0].pairs is None else [p for job in batch for p in job.pairs]
            started = time.perf_counter()
            try:
                probs, labels = self.model(texts, pairs)
                error = None
            except Exception as e:  # answered as a 500; the server keeps serving
                error = e
            if self.metrics is not None:
                self.metrics.observe_batch(len(texts), time.perf_counter() - started,
                                           [started - job.queued for job in batch])
            start = 0
            for job in batch:
                n = len(job.texts)
                result = error if error is not None else (probs[start:start + n], labels[start:start + n])
                start += n
                try:
                    job.loop.call_soon_threadsafe(_resolve, job.future, result)
                except RuntimeError:  # the loop has closed: nobody waits for this answer
                    pass


def _resolve(future, result):
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


# --- metrics --------------------------------------------------------------------------------


class Histogram:
    def __init__(self, buckets):
        self.buckets = list(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float):
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, cumulative = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{_num(bound)}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        wrap = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{wrap} {_num(self.sum)}")
        out.append(f"{name}_count{wrap} {self.count}")
        return out


def _num(x) -> str:
    return repr(float(x))


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and histograms, written in Prometheus' text exposition format."""

    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (endpoint, code) -> n
        self.latency = {}  # endpoint -> Histogram
        self.in_flight = 0
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch})
        self.batch_size = Histogram([s for s in sizes if s <= max_batch])
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.queue_seconds = Histogram(LATENCY_BUCKETS)
        self.texts = 0
        self.started = time.time()

    def observe_request(self, endpoint: str, code: int, seconds: float):
        with self._lock:
            self.requests[endpoint, code] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int, seconds: float, waits):
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
            for w in waits:
                self.queue_seconds.observe(w)
            self.texts += size

    def render(self, queued: int) -> str:
        with self._lock:
            lines = ["# HELP bertfit_requests_total HTTP requests answered, by endpoint and status code.",
                     "# TYPE bertfit_requests_total counter"]
            for (endpoint, code), n in sorted(self.requests.items()):
                lines.append(f'bertfit_requests_total{{endpoint="{endpoint}",code="{code}"}} {n}')
            lines += ["# HELP bertfit_request_duration_seconds Time from request to response, by endpoint.",
                      "# TYPE bertfit_request_duration_seconds histogram"]
            for endpoint, h in sorted(self.latency.items()):
                lines += h.lines("bertfit_request_duration_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP bertfit_requests_in_flight HTTP requests being handled now.",
                      "# TYPE bertfit_requests_in_flight gauge", f"bertfit_requests_in_flight {self.in_flight}",
                      "# HELP bertfit_queued_texts Texts waiting for a model batch.",
                      "# TYPE bertfit_queued_texts gauge", f"bertfit_queued_texts {queued}",
                      "# HELP bertfit_batch_size Texts per model batch.", "# TYPE bertfit_batch_size histogram"]
            lines += self.batch_size.lines("bertfit_batch_size")
            lines += ["# HELP bertfit_batch_duration_seconds Model time per batch.",
                      "# TYPE bertfit_batch_duration_seconds histogram"]
            lines += self.batch_seconds.lines("bertfit_batch_duration_seconds")
            lines += ["# HELP bertfit_batch_wait_seconds Time a request's texts waited for their batch to start.",
                      "# TYPE bertfit_batch_wait_seconds histogram"]
            lines += self.queue_seconds.lines("bertfit_batch_wait_seconds")
            lines += ["# HELP bertfit_texts_total Texts classified.", "# TYPE bertfit_texts_total counter",
                      f"bertfit_texts_total {self.texts}",
                      "# HELP bertfit_start_time_seconds When the server started (Unix time).",
                      "# TYPE bertfit_start_time_seconds gauge", f"bertfit_start_time_seconds {self.started:.3f}"]
        return "\n".join(lines) + "\n"


# --- request parsing ------------------------------------------------------------------------


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _string(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(422, f"{where}: expected a string, got {_kind(value)}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(422, f"{where}: the string is not valid Unicode (a lone surrogate escape such as \\ud800)") from None


def parse_json(body: bytes):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON: nested too deeply") from None


def _object(body, allowed: set[str]):
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_kind(body)}")
    signature = body.get("signature_name", SIGNATURE)
    if signature not in (SIGNATURE, ""):
        raise RequestError(400, f"unknown signature_name {signature!r}: this model has only {SIGNATURE!r}")
    unknown = sorted(set(body) - allowed - {"signature_name"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected {' or '.join(sorted(allowed))}")
    return body


def _pair_from_row(row, where: str, inputs: list[str]):
    if isinstance(row, dict):
        unknown = sorted(set(row) - set(inputs))
        if unknown:
            raise RequestError(422, f"{where}: unknown input(s) {', '.join(map(repr, unknown))}; "
                                    f"this model takes {', '.join(inputs)}")
        missing = [k for k in inputs if k not in row]
        if missing:
            hint = " (this is a sentence-pair model)" if "text_pair" in missing else ""
            raise RequestError(422, f"{where}: missing {', '.join(map(repr, missing))}{hint}")
        text = _string(row["text"], f"{where}.text")
        return text, (_string(row["text_pair"], f"{where}.text_pair") if "text_pair" in inputs else None)
    if len(inputs) > 1:
        raise RequestError(422, f"{where}: this is a sentence-pair model: each instance must be an object "
                                f'{{"text": ..., "text_pair": ...}}, got {_kind(row)}')
    return _string(row, where), None


def _rows(rows, what: str, inputs: list[str]):
    if not isinstance(rows, list):
        raise RequestError(422, f"{what!r} must be a list, got {_kind(rows)}")
    if not rows:
        raise RequestError(422, f"{what!r} is empty: send at least one")
    parsed = [_pair_from_row(row, f"{what}[{i}]", inputs) for i, row in enumerate(rows)]
    texts = [t for t, _ in parsed]
    return texts, ([p for _, p in parsed] if len(inputs) > 1 else None)


def parse_predict(body, inputs: list[str]):
    """(texts, pairs or None, "row" | "column") from a predict request body."""
    body = _object(body, {"instances", "inputs"})
    if ("instances" in body) == ("inputs" in body):
        raise RequestError(400, 'the body needs exactly one of "instances" (row format) or "inputs" (columnar format)')
    if "instances" in body:
        texts, pairs = _rows(body["instances"], "instances", inputs)
        return texts, pairs, "row"
    columns = body["inputs"]
    if isinstance(columns, dict):
        unknown = sorted(set(columns) - set(inputs))
        if unknown:
            raise RequestError(422, f"inputs: unknown input(s) {', '.join(map(repr, unknown))}; "
                                    f"this model takes {', '.join(inputs)}")
        missing = [k for k in inputs if k not in columns]
        if missing:
            hint = " (this is a sentence-pair model)" if "text_pair" in missing else ""
            raise RequestError(422, f"inputs: missing {', '.join(map(repr, missing))}{hint}")
        lists = {}
        for k in inputs:
            col = columns[k]
            if not isinstance(col, list):
                raise RequestError(422, f"inputs.{k} must be a list of strings, got {_kind(col)}")
            if not col:
                raise RequestError(422, f"inputs.{k} is empty: send at least one")
            lists[k] = [_string(v, f"inputs.{k}[{i}]") for i, v in enumerate(col)]
        if len(inputs) > 1 and len(lists["text"]) != len(lists["text_pair"]):
            raise RequestError(422, f"inputs.text has {len(lists['text'])} strings but inputs.text_pair has "
                                    f"{len(lists['text_pair'])}")
        return lists["text"], lists.get("text_pair"), "column"
    if len(inputs) > 1:
        raise RequestError(422, 'this is a sentence-pair model: "inputs" must be {"text": [...], "text_pair": [...]}')
    if not isinstance(columns, list):
        raise RequestError(422, f'"inputs" must be a list of strings or {{"text": [...]}}, got {_kind(columns)}')
    if not columns:
        raise RequestError(422, '"inputs" is empty: send at least one')
    return [_string(v, f"inputs[{i}]") for i, v in enumerate(columns)], None, "column"


def parse_classify(body, inputs: list[str]):
    """(texts, pairs or None) from a classify request body (`examples`, optional `context`)."""
    body = _object(body, {"examples", "context"})
    if "examples" not in body:
        raise RequestError(400, 'the body needs "examples": a list of objects such as {"text": "..."}')
    context = body.get("context", {})
    if not isinstance(context, dict):
        raise RequestError(422, f'"context" must be an object, got {_kind(context)}')
    examples = body["examples"]
    if not isinstance(examples, list):
        raise RequestError(422, f'"examples" must be a list, got {_kind(examples)}')
    for i, e in enumerate(examples):
        if not isinstance(e, dict):
            raise RequestError(422, f'examples[{i}]: expected an object such as {{"text": "..."}}, got {_kind(e)}')
    return _rows([{**context, **e} for e in examples], "examples", inputs)


# --- the ASGI application -------------------------------------------------------------------


def build_app(model: Model, max_batch: int = 64, batch_timeout_ms: float = 5.0,
              max_body_bytes: int = 10 * 1024 * 1024, max_instances: int = 1024, allowed_hosts=None,
              read_timeout_s: float = 30.0):
    """The Starlette application (the batcher starts and drains with the app's lifespan).
    `allowed_hosts`: the host names a request's Host header may name (None: any). A body that has not
    arrived `read_timeout_s` after its request's head gets 408 and the connection is closed."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    metrics = Metrics(max_batch)
    batcher = Batcher(model, max_batch=max_batch, timeout_s=batch_timeout_ms / 1000, metrics=metrics)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    def check_model(request):
        name = request.path_params["name"]
        if request.method != "POST" and name.rsplit(":", 1)[-1] in ("predict", "classify", "regress"):
            raise RequestError(405, f"{request.method} is not allowed on {request.url.path}: use POST")
        if name != model.name:
            raise RequestError(404, f"no model named {name!r}; this server serves {model.name!r}")
        version = request.path_params.get("version")
        if version is not None and version != VERSION:
            raise RequestError(404, f"model {model.name!r} has no version {version!r}; its only version is {VERSION}")

    async def read_json(request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in JSON_TYPES and not content_type.endswith("+json"):
            given = f"content type {content_type!r}" if content_type else "no content type"
            raise RequestError(415, f"{given}: send JSON with the header Content-Type: application/json "
                                    "(curl: -H 'Content-Type: application/json')")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RequestError(415, f"unsupported content encoding {encoding!r}: send the JSON uncompressed")
        try:
            async with asyncio.timeout(read_timeout_s):
                body = await read_body(request)
        except TimeoutError:
            raise RequestError(408, f"the body did not arrive within {read_timeout_s:g} s (--read-timeout)") from None
        except ClientDisconnect:  # nobody to answer: counted, not logged
            raise RequestError(499, "the client closed the connection before sending the whole body") from None
        if not body.strip():
            raise RequestError(400, "the body is empty: send a JSON object")
        return body

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            if int(declared) <= DRAIN_LIMIT_BYTES:
                await drain(request)
            raise RequestError(413, f"the body has {int(declared)} bytes; the limit is {max_body_bytes} (--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                await drain(request, size)
                raise RequestError(413, f"the body is over the limit of {max_body_bytes} bytes (--max-body-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def drain(request, size=0):
        """Read (and drop) an oversized body so the client gets the 413 rather than a reset connection."""
        with contextlib.suppress(Exception):
            async for chunk in request.stream():
                size += len(chunk)
                if size > DRAIN_LIMIT_BYTES:
                    break

    async def off_loop(fn, *args, big=False):
        """Run CPU work (parsing, validating, serializing large payloads) off the event loop when large."""
        if big:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return fn(*args)

    async def parsed(request, parse):
        """Read and parse a request's body; the batcher knows it is coming meanwhile."""
        batcher.arrive()
        try:
            body = await read_json(request)
            big = len(body) > PARSE_IN_THREAD_BYTES
            result = await off_loop(lambda: parse(parse_json(body), model.inputs), big=big)
            if len(result[0]) > max_instances:
                raise RequestError(413, f"the request has {len(result[0])} texts; the limit is {max_instances} "
                                        "per request (--max-instances): send them in several requests")
            return result, big
        except BaseException:
            batcher.leave()
            raise

    async def predict(request):
        check_model(request)
        (texts, pairs, form), big = await parsed(request, parse_predict)
        probs, labels = await batcher.submit(texts, pairs, arrived=True)
        if form == "row":
            payload = {"predictions": [{"probabilities": p, "label": label}
                                       for p, label in zip(probs.tolist(), labels)]}
        else:
            payload = {"outputs": {"probabilities": probs.tolist(), "label": labels}}
        return Response(await off_loop(_dumps, payload, big=big), media_type="application/json")

    async def classify(request):
        check_model(request)
        (texts, pairs), big = await parsed(request, parse_classify)
        probs, _ = await batcher.submit(texts, pairs, arrived=True)
        payload = {"results": [[[name, p] for name, p in zip(model.labels, row)] for row in probs.tolist()]}
        return Response(await off_loop(_dumps, payload, big=big), media_type="application/json")

    async def post_action(request):
        action = request.path_params["action"]
        if action == "predict":
            return await predict(request)
        if action == "classify":
            return await classify(request)
        if action == "regress":
            raise RequestError(400, f"model {model.name!r} is a classifier: use :predict or :classify, not :regress")
        raise RequestError(404, f"unknown method {action!r}: use :predict or :classify")

    async def status(request):
        check_model(request)
        return JSONResponse({"model_version_status": [
            {"version": VERSION, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})

    async def metadata(request):
        check_model(request)
        return JSONResponse(metadata_json(model))

    async def healthz(request):
        return JSONResponse({"status": "ok", "model": model.name})

    async def prometheus(request):
        return PlainTextResponse(metrics.render(batcher.queued_texts), media_type="text/plain; version=0.0.4")

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}")
        return error(status, f"no such path: {request.method} {request.url.path} "
                             f"(try POST /v1/models/{model.name}:predict)" if status == 404 else str(exc.detail))

    async def request_error(request, exc: RequestError):
        response = error(exc.status, exc.message)
        if exc.status in (408, 413, 499):  # the rest of the body may never come: do not wait for it
            response.headers["connection"] = "close"
        return response

    async def server_error(request, exc: Exception):
        print(f"bertfit serve: error on {request.method} {request.url.path}: {exc!r}", file=sys.stderr)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    model_path = "/v1/models/{name}"
    routes = [
        Route(model_path + ":{action}", post_action, methods=["POST"]),
        Route(model_path + "/versions/{version}:{action}", post_action, methods=["POST"]),
        Route(model_path, status, methods=["GET"]),
        Route(model_path + "/versions/{version}", status, methods=["GET"]),
        Route(model_path + "/metadata", metadata, methods=["GET"]),
        Route(model_path + "/versions/{version}/metadata", metadata, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    from starlette.exceptions import HTTPException

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        HTTPException: not_found, RequestError: request_error, Exception: server_error})
    app.state.batcher, app.state.metrics, app.state.model = batcher, metrics, model
    return _Instrumented(app, metrics, allowed_hosts)


def _dumps(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _Instrumented:
    """ASGI middleware: counts requests by endpoint and status, their latency, and those in flight."""

    def __init__(self, app, metrics: Metrics, allowed_hosts=None):
        self.app, self.metrics, self.allowed_hosts = app, metrics, allowed_hosts
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope.get("path", ""))
        status = {"code": 500}
        if self.allowed_hosts is not None:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.allowed_hosts:
                # Starlette's TrustedHostMiddleware would do, but it splits "[::1]:8501" at the first colon.
                self.metrics.observe_request(endpoint, 403, 0.0)
                body = _dumps({"error": f"Host {host!r} is not this server's name: bound to a loopback address, "
                                        f"it answers {', '.join(self.allowed_hosts)} only (serve --host to change)"})
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.observe_request(endpoint, status["code"], time.perf_counter() - started)


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: "[::1]:8501" -> "::1", "localhost:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _endpoint(path: str) -> str:
    """A low-cardinality endpoint label for metrics."""
    if path.startswith("/v1/models/"):
        for action in ("predict", "classify"):
            if path.endswith(":" + action):
                return action
        return "metadata" if path.endswith("/metadata") else "status"
    return {"/healthz": "healthz", "/metrics": "metrics"}.get(path, "other")


def metadata_json(model: Model) -> dict:
    """TF Serving's GetModelMetadata answer for the `serving_default` signature, plus bertfit's own details."""

    def tensor(name, dtype, dims):
        return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                                 "unknown_rank": False}, "name": name}

    inputs = {k: tensor(f"{SIGNATURE}_{k}:0", "DT_STRING", [-1]) for k in model.inputs}
    outputs = {"probabilities": tensor("StatefulPartitionedCall:0", "DT_FLOAT", [-1, len(model.labels)]),
               "label": tensor("StatefulPartitionedCall:1", "DT_STRING", [-1])}
    c = model.clf.train_config
    return {
        "model_spec": {"name": model.name, "signature_name": "", "version": VERSION},
        "metadata": {"signature_def": {
            "signature_def": {SIGNATURE: {"inputs": inputs, "outputs": outputs,
                                          "method_name": "tensorflow/serving/predict"}},
            "@type": "type.googleapis.com/tensorflow.serving.SignatureDefMap"}},
        "bertfit": {"labels": model.labels, "multilabel": model.multilabel,
                    "thresholds": None if model.clf.thresholds is None else [float(t) for t in model.clf.thresholds],
                    "max_length": c.max_length, "truncation": c.truncation, "long_text": c.long_text,
                    "pairs": model.pairs},
    }


# --- serve() --------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when proto says TCP
    # (with proto 0, Nagle + delayed ACK add 40 ms to every response sent in two writes).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BertfitError(f"cannot listen on {host}:{port}: {e.strerror or e}"
                           + (" (another server uses it; pick another with --port)" if e.errno == 98 else "")) from None
    sock.set_inheritable(True)
    return sock


def serve(run, host: str = "127.0.0.1", port: int = 8501, model_name: str | None = None, max_batch: int = 64,
          batch_timeout_ms: float = 5.0, max_body_bytes: int = 10 * 1024 * 1024, max_instances: int = 1024,
          read_timeout_s: float = 30.0, log_level: str = "warning"):
    """Serve a run folder over HTTP with TF Serving's REST API until SIGTERM or Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise BertfitError("serving needs starlette and uvicorn: pip install starlette uvicorn") from None
    if max_batch < 1:
        raise BertfitError(f"--max-batch must be at least 1, got {max_batch}")
    if not batch_timeout_ms >= 0 or math.isinf(batch_timeout_ms):
        raise BertfitError(f"--batch-timeout-ms must be a number >= 0, got {batch_timeout_ms}")
    if max_body_bytes < 1:
        raise BertfitError(f"--max-body-bytes must be positive, got {max_body_bytes}")
    if max_instances < 1:
        raise BertfitError(f"--max-instances must be at least 1, got {max_instances}")
    if not read_timeout_s > 0 or math.isinf(read_timeout_s):
        raise BertfitError(f"--read-timeout must be a number of seconds > 0, got {read_timeout_s}")
    name = model_name or Path(run).resolve().name
    if not name or "/" in name or ":" in name:
        raise BertfitError(f"model name {name!r} cannot appear in a URL path; pick another with --model-name")

    sock = _bind(host, port)  # the port is taken now (a busy one fails at once), connections come after loading
    model = Model(run, name=name)
    model.warm_up()
    loopback = host.strip("[]").lower() in LOOPBACK_NAMES or host.startswith("127.")
    app = build_app(model, max_batch=max_batch, batch_timeout_ms=batch_timeout_ms, max_body_bytes=max_body_bytes,
                    max_instances=max_instances, allowed_hosts=(*LOOPBACK_NAMES, host.lower()) if loopback else None,
                    read_timeout_s=read_timeout_s)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=60,
                            timeout_keep_alive=30, lifespan="on", http=_protocol(read_timeout_s))
    server = _Server(config)

    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound_port}/v1/models/{name}"
    example = '{"instances": [{"text": "a gripping film", "text_pair": "a dull one"}]}' if model.pairs \
        else '{"instances": ["a gripping, beautifully shot film"]}'
    print(f"bertfit serve: model {name!r} ({len(model.labels)} labels: {', '.join(model.labels[:8])}"
          f"{', ...' if len(model.labels) > 8 else ''}) at {url}\n"
          f"  model: {model.backend}; batching up to {max_batch} texts, waiting at most {batch_timeout_ms:g} ms; Ctrl-C or SIGTERM stops\n"
          f"  try: curl -s -X POST {url}:predict -H 'Content-Type: application/json' -d '{example}'",
          flush=True)
    sock.listen(2048)
    server.run(sockets=[sock])
    print("bertfit serve: stopped", file=sys.stderr, flush=True)


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = _dumps({"error": message})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def _protocol(read_timeout_s: float):
    """uvicorn's h11 protocol, with two limits it lacks: a request's head must arrive within
    read_timeout_s of the connection's start or of the previous response (else 408, or a plain close
    when nothing came: uvicorn closes idle connections only after a response, so idle and half-sent
    requests held their connections forever), and a head over 16 KiB gets 431 (h11 limits only heads
    that arrive in parts, and uvicorn answers those 400)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm_head_timer()

        def data_received(self, data):
            if self.cycle is None or self.cycle.response_complete:  # a head is coming
                pending = self.conn.trailing_data[0] + data
                end = pending.find(b"\r\n\r\n")
                if (end if end >= 0 else len(pending)) > HEAD_LIMIT_BYTES:
                    self.transport.write(_raw_response(431, "Request Header Fields Too Large",
                                                       f"the request's head is over {HEAD_LIMIT_BYTES // 1024} KiB"))
                    self.transport.close()
                    return
            super().data_received(data)

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def on_response_complete(self):
            super().on_response_complete()
            self.arm_head_timer()

        def arm_head_timer(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
            if not self.transport.is_closing():
                self.head_timer = self.loop.call_later(read_timeout_s, self.head_timeout)

        def head_timeout(self):
            """No request in progress when the time is up: close (with 408 if part of a head came)."""
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self.conn.trailing_data[0]:
                self.transport.write(_raw_response(408, "Request Timeout",
                                                   f"the request's head did not arrive within {read_timeout_s:g} s"))
            self.transport.close()

    return Protocol


try:
    import uvicorn as _uvicorn

    class _Server(_uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT that shut it down gracefully is not re-raised
        afterwards (uvicorn re-raises it, which would end the process with the signal's status, not 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()
except ImportError:  # pragma: no cover - serve() explains what to install
    _Server = None
