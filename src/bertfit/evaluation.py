"""Evaluation: metrics, threshold choice, worst errors, and a self-contained HTML report.

Numpy only. Every metric is defined as scikit-learn defines it (tests check parity to
1e-9), so numbers from bertfit can be compared with numbers from anywhere else.

Conventions:
- single-label (binary and multi-class): `probs` are softmax rows [N, C], `y_true` int ids
  [N]; the prediction is the argmax; for binary the positive class is index 1.
- multi-label: `probs` are sigmoid outputs [N, C], `y_true` is multi-hot [N, C]; label j
  is predicted when probs[:, j] >= thresholds[j] (default 0.5), as in sklearn's curves.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5
# Candidate thresholds for choose_thresholds: 0.01 .. 0.99. A fixed grid (not the
# validation scores themselves) keeps the choice from overfitting single examples.
DEFAULT_GRID = np.round(np.arange(1, 100) / 100, 2)


# ---------------------------------------------------------------------------- inputs


def _check(y_true, probs, label_names=None, multilabel=False):
    """Validate shapes and ranges once, so every metric below can trust its inputs."""
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty [N, C] array, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    n, c = p.shape
    y = np.asarray(y_true)
    if multilabel:
        if y.shape != p.shape:
            raise ValueError(f"multi-label y_true must have the shape of probs {p.shape}, got {y.shape}")
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("multi-label y_true must be multi-hot (0/1 only)")
        y = y.astype(bool)
    else:
        y = y.reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"y_true has {y.shape[0]} labels but probs has {n} rows")
        yi = y.astype(np.int64)
        if not np.all(yi == y) or yi.min() < 0 or yi.max() >= c:
            raise ValueError(f"y_true must hold integer class ids in [0, {c - 1}]")
        y = yi
    if label_names is not None:
        names = [str(s) for s in label_names]
        if len(names) != c:
            raise ValueError(f"{len(names)} label names for {c} classes")
        if len(set(names)) != c:
            raise ValueError("label names must be unique")
    return y, p


def _thresholds(thresholds, c) -> np.ndarray:
    """Per-label thresholds as float64 [C]: None -> 0.5, a scalar -> the same for all."""
    t = np.asarray(DEFAULT_THRESHOLD if thresholds is None else thresholds, np.float64)
    if t.ndim == 0:
        t = np.full(c, float(t))
    if t.shape != (c,):
        raise ValueError(f"need one threshold per label ({c}), got shape {t.shape}")
    return t


def _to_str(x):
    """Texts may arrive as bytes (from tf.data) or numpy strings; show them as str."""
    if x is None:
        return None
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    return str(x)


def _e(x) -> str:
    """HTML-escape anything shown in the report: texts and label names are user data."""
    return html.escape(str(x), quote=True)


# ---------------------------------------------------------------------------- metrics


def predictions(probs, multilabel=False, thresholds=None) -> np.ndarray:
    """Argmax class ids [N] (single-label), or a multi-hot int array [N, C] (multi-label)."""
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    if not multilabel:
        if thresholds is not None:
            raise ValueError("thresholds apply to multi-label tasks only")
        return np.argmax(p, axis=1)
    # Compare in float64 so a threshold means the same here and in choose_thresholds.
    return (p.astype(np.float64) >= _thresholds(thresholds, p.shape[1])).astype(np.int64)


def _div(a, b) -> np.ndarray:
    """a / b with 0.0 where b == 0 (sklearn's zero_division=0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def _prf(tp, fp, fn):
    # F1 as 2tp / (2tp + fp + fn), which is how sklearn computes it (0 when undefined).
    return _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)


def _mcc(cm) -> float:
    """Matthews correlation from a confusion matrix, exactly as sklearn.matthews_corrcoef."""
    cm = np.asarray(cm, np.float64)  # float: the covariance product is ~n**4, past int64 at ~55k rows
    t_sum, p_sum = cm.sum(axis=1), cm.sum(axis=0)
    n = p_sum.sum()
    cov_ytyp = np.trace(cm) * n - t_sum @ p_sum
    cov_ypyp_ytyt = (n**2 - p_sum @ p_sum) * (n**2 - t_sum @ t_sum)
    return 0.0 if cov_ypyp_ytyt == 0 else float(cov_ytyp / np.sqrt(cov_ypyp_ytyt))


def _binary_curve(y, score):
    """Counts at each distinct score, highest first: (fps, tps, thresholds), as sklearn's
    _binary_clf_curve. Tied scores form one point, which is how ties are handled."""
    score = np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    score, y = score[order], np.asarray(y, bool)[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(score)), score.size - 1]
    tps = np.cumsum(y)[last_of_group].astype(np.float64)
    fps = 1 + last_of_group - tps
    return fps, tps, score[last_of_group]


def _roc(y, score):
    """(fpr, tpr, auc); auc is None when y holds one class only (sklearn gives nan)."""
    fps, tps, _ = _binary_curve(y, score)
    if fps[-1] == 0 or tps[-1] == 0:
        return None, None, None
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def _pr(y, score):
    """(recall, precision, average_precision) with sklearn's step-wise AP:
    sum_k (R_k - R_{k-1}) * P_k. With no positives sklearn returns AP 0.0; so do we."""
    fps, tps, _ = _binary_curve(y, score)
    precision = tps / (tps + fps)  # tps + fps >= 1 at every point
    if tps[-1] == 0:
        return None, None, 0.0
    recall = tps / tps[-1]
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    # The curve starts at (recall 0, precision 1), as sklearn's does.
    return np.r_[0.0, recall], np.r_[1.0, precision], ap


def _log_loss(y, p, multilabel) -> float:
    # sklearn clips to [eps, 1 - eps] of the input's float type (float32 or float64).
    eps = np.finfo(np.float32 if p.dtype == np.float32 else np.float64).eps
    p = p.astype(np.float64)
    if multilabel:
        # Mean binary cross-entropy over all (example, label) cells: sklearn's
        # log_loss(y.ravel(), p.ravel()), and what a sigmoid head is trained on.
        pos, neg = np.clip(p, eps, 1 - eps), np.clip(1 - p, eps, 1 - eps)
        return float(-np.mean(np.where(y, np.log(pos), np.log(neg))))
    p_true = np.clip(p[np.arange(len(y)), y], eps, 1 - eps)
    return float(-np.mean(np.log(p_true)))


def classification_metrics(y_true, probs, label_names, *, multilabel=False, thresholds=None) -> dict:
    """All metrics as a JSON-serializable dict (see the module docstring for conventions).

    Keys: accuracy, {precision,recall,f1}_{macro,micro,weighted}, per_class
    {name: {precision, recall, f1, support}}, mcc, log_loss, confusion_matrix,
    num_examples; binary also f1_positive, roc_auc and pr_auc (positive class = index 1; roc_auc is
    None when y_true holds one class); multi-label also subset_accuracy (= accuracy),
    hamming_loss and thresholds, and confusion_matrix is {name: [[tn, fp], [fn, tp]]}.
    """
    y, p = _check(y_true, probs, label_names, multilabel)
    names = [str(s) for s in label_names]
    n, c = p.shape
    pred = predictions(p, multilabel, thresholds)

    if multilabel:
        pred = pred.astype(bool)
        tp = (y & pred).sum(axis=0)
        fp = (~y & pred).sum(axis=0)
        fn = (y & ~pred).sum(axis=0)
        tn = n - tp - fp - fn
        support = y.sum(axis=0)
    else:
        cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
        tp = np.diag(cm)
        fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
        support = cm.sum(axis=1)

    precision, recall, f1 = _prf(tp, fp, fn)
    micro = _prf(tp.sum(), fp.sum(), fn.sum())
    weights = support / support.sum() if support.sum() else np.zeros(c)  # 0.0 when no support at all

    m: dict[str, Any] = {}
    if multilabel:
        m["accuracy"] = m["subset_accuracy"] = float(np.mean(np.all(y == pred, axis=1)))
        m["hamming_loss"] = float(np.mean(y != pred))
    else:
        m["accuracy"] = float(np.mean(pred == y))
    for avg, (pr, rc, f) in {
        "macro": (precision.mean(), recall.mean(), f1.mean()),
        "micro": micro,
        "weighted": (precision @ weights, recall @ weights, f1 @ weights),
    }.items():
        m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"] = float(pr), float(rc), float(f)
    m["per_class"] = {
        name: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
        }
        for j, name in enumerate(names)
    }
    if multilabel:
        # MCC of the flattened label matrix: one 2x2 table summed over labels.
        m["mcc"] = _mcc([[tn.sum(), fp.sum()], [fn.sum(), tp.sum()]])
    else:
        m["mcc"] = _mcc(cm)
    if not multilabel and c == 2:
        m["f1_positive"] = float(f1[1])  # F1 of the positive class (index 1), e.g. GLUE's MRPC F1
        m["roc_auc"] = _roc(y == 1, p[:, 1])[2]
        m["pr_auc"] = _pr(y == 1, p[:, 1])[2]
    m["log_loss"] = _log_loss(y, p, multilabel)
    if multilabel:
        m["confusion_matrix"] = {
            name: [[int(tn[j]), int(fp[j])], [int(fn[j]), int(tp[j])]] for j, name in enumerate(names)
        }
        m["thresholds"] = [float(t) for t in _thresholds(thresholds, c)]
    else:
        m["confusion_matrix"] = cm.tolist()
    m["num_examples"] = int(n)
    return m


def choose_thresholds(y_true, probs, grid=None) -> np.ndarray:
    """Multi-label: per label, the grid threshold that maximizes that label's F1 on these
    (validation) examples. Ties go to the threshold closest to 0.5 (then the lower one);
    labels without positives keep 0.5, as there is nothing to tune on."""
    y, p = _check(y_true, probs, multilabel=True)
    grid = np.unique(np.asarray(DEFAULT_GRID if grid is None else grid, np.float64))
    if grid.size == 0:
        raise ValueError("grid is empty")
    p = p.astype(np.float64)
    n, c = p.shape
    out = np.full(c, DEFAULT_THRESHOLD)
    for j in range(c):
        n_pos = int(y[:, j].sum())
        if n_pos == 0:
            continue
        # Counts of scores >= t for every t at once, by binary search in sorted scores.
        predicted_pos = n - np.searchsorted(np.sort(p[:, j]), grid, side="left")
        tp = n_pos - np.searchsorted(np.sort(p[y[:, j], j]), grid, side="left")
        f1 = 2 * tp / (predicted_pos + n_pos)
        best = grid[f1 == f1.max()]  # equal rationals give equal floats, so == is exact
        out[j] = best[np.argmin(np.abs(best - DEFAULT_THRESHOLD))]
    return out


def worst_errors(
    y_true, probs, label_names, texts, pairs=None, n=20, multilabel=False, thresholds=None, where=None, unit=None
) -> list[dict]:
    """The n most confident mistakes, most confident first (ties keep input order).

    Each: {index, text, pair, true, predicted, confidence}, index 0-based among the examples given;
    with where (each example's place, e.g. Examples.where) also {unit: place}, e.g. "line": 19, the
    number that errors and predict output use. Single-label: true/predicted
    are label names and confidence is the probability of the predicted class. Multi-label:
    true/predicted are lists of label names, and confidence is the probability behind the
    surest wrong decision (p for a false positive, 1 - p for a false negative).
    `texts` may be None (only indexes are reported).
    """
    y, p = _check(y_true, probs, label_names, multilabel)
    names = [str(s) for s in label_names]
    for what, seq in (("texts", texts), ("pairs", pairs)):
        if seq is not None and len(seq) != len(p):
            raise ValueError(f"{len(seq)} {what} for {len(p)} examples")
    pred = predictions(p, multilabel, thresholds)
    if multilabel:
        wrong = pred.astype(bool) != y
        sure = np.where(pred == 1, p, 1 - p).astype(np.float64)
        confidence = np.where(wrong, sure, -np.inf).max(axis=1)
        mistakes = np.flatnonzero(wrong.any(axis=1))
    else:
        confidence = p[np.arange(len(y)), pred].astype(np.float64)
        mistakes = np.flatnonzero(pred != y)
    order = mistakes[np.argsort(-confidence[mistakes], kind="stable")][: max(int(n), 0)]

    def label(i, row):
        return [names[j] for j in np.flatnonzero(row[i])] if multilabel else names[row[i]]

    return [
        {
            "index": int(i),
            **({unit or "where": where[i]} if where is not None else {}),
            "text": _to_str(texts[i]) if texts is not None else None,
            "pair": _to_str(pairs[i]) if pairs is not None else None,
            "true": label(i, y),
            "predicted": label(i, pred),
            "confidence": float(confidence[i]),
        }
        for i in order
    ]


# ---------------------------------------------------------------------------- SVG charts

# Tableau 10: distinct on white and for most color vision deficiencies.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
_MAX_LEGEND = 10  # classes drawn in color and named; the rest are drawn thin and gray
_MAX_CURVE_POINTS = 200


def _downsample(x, y, max_points=_MAX_CURVE_POINTS):
    """Keep points evenly spaced along the curve's length, so steep parts keep their shape
    (an even stride over thresholds would lose them) and the file stays small."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size <= max_points:
        return x, y
    xs, ys = (x - x.min()) / (np.ptp(x) or 1), (y - y.min()) / (np.ptp(y) or 1)
    s = np.r_[0.0, np.cumsum(np.hypot(np.diff(xs), np.diff(ys)))]
    idx = np.searchsorted(s, np.linspace(0, s[-1], max_points)).clip(0, x.size - 1)
    idx = np.unique(np.r_[0, idx, x.size - 1])
    return x[idx], y[idx]


def _ticks(lo, hi, count=5, integer=False):
    """Round-number ticks (1, 2, 5 x 10^k) covering [lo, hi]; whole numbers only if integer."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1.0) if integer else step  # no "epoch 1.5"
    first = np.ceil(lo / step - 1e-9) * step
    return [float(t) for t in np.arange(first, hi + step * 1e-6, step)]


def _fmt_tick(t):
    return f"{t + 0.0:.4g}" if abs(t) > 1e-12 else "0"  # never "-0"


def _line_chart(
    series, *, xlabel, ylabel, xlim=None, ylim=None, diagonal=False, integer_x=False, width=440, height=300
):
    """One SVG line chart. series: dicts with name, x, y, and optional color, dash, thin,
    legend (False to leave out of the legend). Returns the SVG plus an HTML legend."""
    left, right, top, bottom = 56, 12, 10, 42
    pw, ph = width - left - right, height - top - bottom
    xs = np.concatenate([np.asarray(s["x"], float) for s in series]) if series else np.zeros(1)
    ys = np.concatenate([np.asarray(s["y"], float) for s in series]) if series else np.zeros(1)
    x0, x1 = xlim or (float(xs.min()), float(xs.max()))
    y0, y1 = ylim or (float(ys.min()), float(ys.max()))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if not ylim:  # a little headroom so lines do not run along the frame
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return left + (np.asarray(x, float) - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (np.asarray(y, float) - y0) / (y1 - y0)) * ph

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    for t in _ticks(y0, y1):
        yy = py(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{_fmt_tick(t)}</text>')
    for t in _ticks(x0, x1, integer=integer_x):
        xx = px(t)
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top}" y2="{top + ph}" class="grid"/>')
        out.append(f'<text x="{xx:.1f}" y="{top + ph + 16}" text-anchor="middle">{_fmt_tick(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    if diagonal:
        out.append(
            f'<line x1="{px(x0):.1f}" y1="{py(y0):.1f}" x2="{px(x1):.1f}" y2="{py(y1):.1f}" class="chance"/>'
        )
    # Draw thin (unnamed) series first so the named ones lie on top.
    for s in sorted(series, key=lambda s: not s.get("thin", False)):
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(s["x"]), py(s["y"])))
        color = s.get("color", "#999")
        dash = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        sw = 1 if s.get("thin") else 1.8
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{sw}"{dash}/>')
        if len(s["x"]) <= 30 and not s.get("thin"):  # few points (epochs): mark them
            out.extend(
                f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{color}"/>' for a, b in zip(px(s["x"]), py(s["y"]))
            )
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis">{_e(xlabel)}</text>')
    out.append(
        f'<text transform="translate(14 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" class="axis">'
        f"{_e(ylabel)}</text>"
    )
    out.append("</svg>")
    legend = [
        f'<span><i style="background:{s.get("color", "#999")}"></i>{_e(s["name"])}'
        f'{" (dashed)" if s.get("dash") else ""}</span>'
        for s in series
        if s.get("legend", True)
    ]
    return "".join(out), f'<div class="legend">{"".join(legend)}</div>' if legend else ""


def _figure(title, chart):
    svg, legend = chart
    return f'<figure><figcaption>{_e(title)}</figcaption>{svg}{legend}</figure>'


# ---------------------------------------------------------------------------- report sections


def _num(v, digits=4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}"
    return f"{float(v):.{digits}f}"


def _history_rows(history):
    """Per-epoch dicts and each epoch's per-step training losses, from bertfit's history (a list of
    per-epoch dicts, each with its "step_loss" list) or Keras' History.history (a dict of lists, with
    an optional flat "step_loss" list over all epochs)."""
    if history is None:
        return [], []
    if isinstance(history, dict):
        per_epoch = {k: v for k, v in history.items() if k != "step_loss" and isinstance(v, (list, tuple))}
        n = max((len(v) for v in per_epoch.values()), default=0)
        rows = [{k: v[i] for k, v in per_epoch.items() if i < len(v)} for i in range(n)]
        flat = list(history.get("step_loss") or [])
        if flat and n:  # spread evenly over the epochs
            edges = np.linspace(0, len(flat), n + 1).astype(int)
            return rows, [flat[a:b] for a, b in zip(edges[:-1], edges[1:])]
        return rows, [flat] if flat else []
    rows = [dict(r) for r in history]
    return rows, [list(r.get("step_loss") or []) for r in rows]


def _is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


_CURVE_METRICS = ("f1_macro", "accuracy")
_MAX_STEP_POINTS = 1000  # shown beside the run's own metric, up to three series


def _curves_section(history, metric=None) -> str:
    """Two charts a reader can follow: the loss (training per step, training and validation per epoch)
    and at most three metric series (the run's metric, F1 macro, accuracy), each in its own colour;
    every per-epoch value is in the table below them."""
    rows, step_losses = _history_rows(history)
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in ("epoch", "step", "step_loss") and k not in keys and _is_number(v)]
    if not keys and not any(step_losses):
        return ""
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)] or [1]

    def per_epoch(key):
        pts = [(e, r[key]) for e, r in zip(epochs, rows) if _is_number(r.get(key))]
        return [a for a, _ in pts], [b for _, b in pts]

    def named(key):
        base = key.removeprefix("val_")
        return ("validation " if key.startswith("val_") else "training ") + base.replace("_", " ")

    loss = []
    xs, ys = [], []
    per_epoch_points = max(10, _MAX_STEP_POINTS // len(epochs))
    for e, losses in zip(epochs, step_losses):  # epoch e's steps lie in (e - 1, e]
        if len(losses) > per_epoch_points:  # means of equal runs of steps: a smaller file, less noise
            edges = np.linspace(0, len(losses), per_epoch_points + 1).astype(int)
            losses = [float(np.mean(losses[a:b])) for a, b in zip(edges[:-1], edges[1:])]
        n = len(losses)
        xs += [e - 1 + (i + 1) / n for i in range(n)]
        ys += [float(v) for v in losses]
    if xs:
        loss.append({"name": "training loss per step", "x": xs, "y": ys, "color": "#9ecae1", "thin": True})
    for key, color in (("loss", _PALETTE[0]), ("val_loss", _PALETTE[1])):
        if key in keys:
            x, y = per_epoch(key)
            loss.append({"name": named(key) + " (epoch)" if key == "loss" else named(key), "x": x, "y": y,
                         "color": color})
    chosen = []
    for base in dict.fromkeys(b for b in (metric, *_CURVE_METRICS) if b and b != "loss"):
        chosen += [k for k in (f"val_{base}", base) if k in keys]
    figs = []
    if loss:
        figs.append(_figure("Loss", _line_chart(loss, xlabel="epoch", ylabel="loss", integer_x=True)))
    if chosen:
        colors = [_PALETTE[2], _PALETTE[4], _PALETTE[5]]  # green, purple, brown: not the loss chart's, not red
        series = [{"name": named(k), "x": per_epoch(k)[0], "y": per_epoch(k)[1], "color": c}
                  for k, c in zip(chosen[:3], colors)]
        figs.append(_figure("Metrics", _line_chart(series, xlabel="epoch", ylabel="value", integer_x=True)))
    lr = [k for k in keys if k in ("lr", "learning_rate")]
    if lr:
        x, y = per_epoch(lr[0])
        figs.append(_figure("Learning rate", _line_chart([{"name": "learning rate", "x": x, "y": y,
                                                           "color": _PALETTE[0], "legend": False}],
                                                         xlabel="epoch", ylabel="learning rate", integer_x=True)))
    head = "".join(f"<th>{_e(k)}</th>" for k in ["epoch", *keys])
    body = "".join("<tr>" + f"<td>{e}</td>" + "".join(f"<td>{_num(r.get(k)) if _is_number(r.get(k)) else ''}</td>"
                                                      for k in keys) + "</tr>" for e, r in zip(epochs, rows))
    table = (f"<details><summary>Every value per epoch</summary><table class='num'><tr>{head}</tr>{body}</table>"
             "</details>") if rows else ""
    return f'<h2>Training curves</h2><div class="figs">{"".join(figs)}</div>{table}'


def _confusion_section(metrics, names, multilabel) -> str:
    cm = metrics["confusion_matrix"]
    if multilabel:
        rows = "".join(
            f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{_num(v)}</td>" for v in (c[1][1], c[0][1], c[1][0], c[0][0]))
            + "</tr>"
            for name, c in cm.items()
        )
        return (
            "<h2>Confusion per label</h2><table class='num'><tr><th>label</th><th>TP</th><th>FP</th>"
            f"<th>FN</th><th>TN</th></tr>{rows}</table>"
        )
    cm = np.asarray(cm)
    # Color by share of the true row (recall), so small classes are as readable as big ones.
    share = _div(cm, cm.sum(axis=1, keepdims=True))
    rot = ' class="rot"' if len(names) > 6 else ""  # vertical headers keep many columns narrow
    head = "".join(f'<th{rot} title="{_e(n)}"><div>{_e(n[:18])}</div></th>' for n in names)
    body = []
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            a = share[i, j]
            rgb = "31,119,180" if i == j else "214,39,40"  # correct blue, mistakes red
            ink = "#fff" if a > 0.55 else "#222"
            cells.append(
                f'<td style="background:rgba({rgb},{a:.3f});color:{ink}" '
                f'title="true {_e(name)}, predicted {_e(names[j])}: {a:.1%} of row">{cm[i, j]}</td>'
            )
        body.append(f'<tr><th title="{_e(name)}">{_e(name[:24])}</th>{"".join(cells)}</tr>')
    return (
        "<h2>Confusion matrix</h2><p class='note'>Rows: true label; columns: predicted. "
        "Color: share of the row (blue: correct, red: mistakes).</p>"
        f"<div class='scroll'><table class='cm'><tr><th></th>{head}</tr>{''.join(body)}</table></div>"
    )


def _pr_roc_section(y, p, names, multilabel):
    """ROC and PR figures, plus per-class (ROC AUC, AP) for the per-class table."""
    c = p.shape[1]
    if not multilabel and c == 2:
        classes = [1]  # binary: the positive class only
    else:
        classes = list(range(c))
    truth = {j: (y[:, j] if multilabel else y == j) for j in classes}
    # Name and color the largest classes; draw the rest thin and gray, so 30 classes stay readable.
    by_support = sorted(classes, key=lambda j: -int(truth[j].sum()))
    named = set(by_support[:_MAX_LEGEND])
    roc_series, pr_series, scores, skipped = [], [], {}, []
    for j in classes:
        fpr, tpr, auc = _roc(truth[j], p[:, j])
        rec, prec, ap = _pr(truth[j], p[:, j])
        if auc is None:  # a class absent from y_true (or present everywhere) has no curves
            skipped.append(names[j])
            continue
        scores[j] = (auc, ap)
        style = (
            {"color": _PALETTE[by_support.index(j) % len(_PALETTE)]}
            if j in named
            else {"color": "#bbb", "thin": True, "legend": False}
        )
        fx, fy = _downsample(fpr, tpr)
        roc_series.append({"name": f"{names[j]} (AUC {auc:.3f})", "x": fx, "y": fy, **style})
        rx, ry = _downsample(rec, prec)
        pr_series.append({"name": f"{names[j]} (AP {ap:.3f})", "x": rx, "y": ry, **style})
    if not roc_series:
        return "", scores
    notes = []
    hidden = len(roc_series) - sum(1 for s in roc_series if s.get("legend", True))
    if hidden:
        notes.append(f"{_MAX_LEGEND} largest classes named; {hidden} more drawn in gray.")
    if skipped:
        notes.append("No curve (only one outcome in the data): " + ", ".join(_e(s) for s in skipped) + ".")
    which = f"positive class: {_e(names[1])}" if classes == [1] else "one-vs-rest, per class"
    figs = _figure(
        "ROC curve", _line_chart(roc_series, xlabel="false positive rate", ylabel="true positive rate",
                                 xlim=(0, 1), ylim=(0, 1), diagonal=True)
    ) + _figure("Precision-recall curve", _line_chart(pr_series, xlabel="recall", ylabel="precision",
                                                     xlim=(0, 1), ylim=(0, 1)))
    note = f"<p class='note'>{' '.join(notes)}</p>" if notes else ""
    return f"<h2>ROC and precision-recall ({which})</h2><div class='figs'>{figs}</div>{note}", scores


def _per_class_section(metrics, names, multilabel, scores) -> str:
    thresholds = metrics.get("thresholds") if multilabel else None
    has_scores = multilabel or len(names) > 2  # binary AUC/AP are in the headline already
    cols = ["label", "precision", "recall", "F1", "support"]
    cols += ["threshold"] if thresholds else []
    cols += ["ROC AUC", "AP"] if has_scores else []
    rows = []
    for j, name in enumerate(names):
        pc = metrics["per_class"][name]
        cells = [_num(pc["precision"]), _num(pc["recall"]), _num(pc["f1"]), _num(int(pc["support"]))]
        if thresholds:
            cells.append(_num(thresholds[j], 2))
        if has_scores:
            auc, ap = scores.get(j, (None, None))
            cells += [_num(auc), _num(ap)]
        rows.append(f"<tr><th>{_e(name)}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    head = "".join(f"<th>{c}</th>" for c in cols)
    return f"<h2>Per class</h2><table class='num'><tr>{head}</tr>{''.join(rows)}</table>"


_CLIP_CHARS = 480  # of a long text, shown in the errors table; the whole text is one click away
_CLIP_SPLIT = {"tail": 0.25, "head+tail": 0.5}  # share of the shown characters at the start; else 0.75


def _clip_text(s, truncation=None, limit=_CLIP_CHARS):
    """A long text clipped to the part the model read most of: its start, or with tail and head+tail
    truncation its end or both ends; the characters left out are counted where they were."""
    if len(s) <= limit:
        return _e(s)
    head = int(limit * _CLIP_SPLIT.get(truncation, 0.75))
    tail = limit - head
    cut = f" <span class='cut'>[… {len(s) - limit:,} characters …]</span> "
    return _e(s[:head]) + cut + _e(s[len(s) - tail:]) if tail else _e(s[:head]) + cut


def _text_cell(s, truncation):
    """The clipped text, and the whole of a long one behind a click."""
    if s is None:
        return "<i>(no text)</i>"
    if len(s) <= _CLIP_CHARS:
        return _e(s)
    return f"{_clip_text(s, truncation)}<details><summary>whole text</summary>{_e(s)}</details>"


def _errors_section(errors, multilabel, truncation=None, unit=None) -> str:
    if not errors:
        return "<h2>Worst errors</h2><p class='note'>No misclassified examples.</p>"
    has_pair = any(e["pair"] is not None for e in errors)

    def show(v):
        return ", ".join(v) if isinstance(v, list) else v

    # Each error's place as the data's own numbering (a line, a row, a file), else its 1-based position.
    key = unit if unit and unit in errors[0] else None

    def place(e):
        if key != "file":
            return _e(str(e[key] if key else e["index"] + 1))
        # A file: its label folder and name (the whole path on hover), as the table has little room.
        return f"<span title='{_e(e[key])}'>{_e('/'.join(str(e[key]).split('/')[-2:]))}</span>"

    rows = []
    for rank, e in enumerate(errors, 1):
        text = _text_cell(e["text"], truncation)
        pair = f"<td class='text'>{_text_cell(e['pair'] or '', truncation)}</td>" if has_pair else ""
        rows.append(
            f"<tr><td>{rank}</td><td>{place(e)}</td><td>{_e(show(e['true']))}</td>"
            f"<td>{_e(show(e['predicted']))}</td><td>{e['confidence']:.3f}</td>"
            f"<td class='text'>{text}</td>{pair}</tr>"
        )
    what = "probability behind the surest wrong label decision" if multilabel else "probability of the predicted class"
    return (
        f"<h2>Worst errors</h2><p class='note'>Most confident mistakes first; confidence is the {what}.</p>"
        f"<table class='errors'><tr><th>#</th><th>{_e(key or 'example')}</th><th>true</th><th>predicted</th><th>confidence</th>"
        f"<th>text</th>{'<th>pair</th>' if has_pair else ''}</tr>{''.join(rows)}</table>"
    )


def _config_text(config) -> str:
    if isinstance(config, str):
        return config  # already YAML or JSON text
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.dumps(config, indent=2, default=str)


def _headline(metrics, multilabel) -> str:
    keys = ["subset_accuracy" if multilabel else "accuracy", "f1_macro", "f1_micro", "f1_weighted", "mcc",
            "roc_auc", "pr_auc", "hamming_loss", "log_loss", "num_examples"]
    labels = {"subset_accuracy": "subset accuracy", "f1_macro": "F1 macro", "f1_micro": "F1 micro",
              "f1_weighted": "F1 weighted", "mcc": "MCC", "roc_auc": "ROC AUC", "pr_auc": "PR AUC (AP)",
              "hamming_loss": "Hamming loss", "log_loss": "log loss", "num_examples": "examples"}
    cards = "".join(
        f"<div class='card'><b>{_num(metrics[k])}</b><span>{labels.get(k, k)}</span></div>"
        for k in keys
        if k in metrics
    )
    return f"<div class='cards'>{cards}</div>"


REPORT_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
 max-width:1120px;margin:24px auto;padding:0 16px}
h1{font-size:24px;margin:0 0 12px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:96px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
.figs{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}
svg.chart text{font-size:11px;fill:#444}svg.chart text.axis{font-size:12px;fill:#222}
svg.chart .grid{stroke:#eee}svg.chart .frame{fill:none;stroke:#999}svg.chart .chance{stroke:#bbb;stroke-dasharray:4,4}
.legend{max-width:440px;font-size:12px}.legend span{display:inline-block;margin-right:10px;white-space:nowrap}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
table{border-collapse:collapse;margin:4px 0}th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f6f6f6;text-align:left}table.num td{text-align:right;font-variant-numeric:tabular-nums}
table.cm td{text-align:center;min-width:30px;font-variant-numeric:tabular-nums}
th.rot{height:110px;vertical-align:bottom;padding:2px}th.rot div{writing-mode:vertical-rl;transform:rotate(180deg)}
.scroll{overflow-x:auto}td.text{max-width:560px;white-space:pre-wrap;word-break:break-word;font-size:13px}td.text .cut{color:#888;font-style:italic}td.text details{color:#555}
.note{color:#666;font-size:12px}pre{background:#f6f6f6;padding:10px;overflow-x:auto;font-size:12px}
tr.best td{background:#fff3e0;font-weight:600}.bar{height:12px;background:#3182bd}table.imp td{border:none}
td.n{text-align:right;font-variant-numeric:tabular-nums}
"""  # shared by report.html and tuning.html


def write_report(
    path,
    *,
    metrics,
    label_names,
    y_true,
    probs,
    texts=None,
    pairs=None,
    history=None,
    multilabel=False,
    thresholds=None,
    title="bertfit report",
    config=None,
    n_errors=20,
    metric=None,
    truncation=None,
    where=None,
    unit=None,
) -> Path:
    """Write one self-contained HTML report (inline CSS and SVG, nothing fetched), atomically.

    `metrics` is classification_metrics' dict (computed here when None); curves and
    errors are computed from y_true and probs. metric: the run's own metric, charted per epoch beside
    F1 macro and accuracy; truncation: which end of a long text the errors table keeps (as the model
    read it); where, unit: each example's place in its data (Examples.where, .unit), shown with the errors.
    Returns the path written.
    """
    y, p = _check(y_true, probs, label_names, multilabel)
    names = [str(s) for s in label_names]
    if metrics is None:
        metrics = classification_metrics(y, p, names, multilabel=multilabel, thresholds=thresholds)
    if multilabel and thresholds is None:
        thresholds = metrics.get("thresholds")  # so errors use the thresholds the metrics used

    pr_roc, scores = _pr_roc_section(y, p, names, multilabel)
    errors = worst_errors(y, p, names, texts, pairs, n=n_errors, multilabel=multilabel, thresholds=thresholds,
                          where=where, unit=unit)
    parts = [
        f"<h1>{_e(title)}</h1>",
        _headline(metrics, multilabel),
        _curves_section(history, metric),
        _confusion_section(metrics, names, multilabel),
        pr_roc,
        _per_class_section(metrics, names, multilabel, scores),
        _errors_section(errors, multilabel, truncation, unit),
    ]
    if config is not None:
        parts.append(f"<h2>Configuration</h2><pre>{_e(_config_text(config))}</pre>")
    parts.append(
        "<details><summary>All metrics (JSON)</summary>"
        f"<pre>{_e(json.dumps(metrics, indent=1, default=str))}</pre></details>"
    )
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{REPORT_CSS}</style></head><body>"
        + "\n".join(s for s in parts if s)
        + "</body></html>\n"
    )
    return _write_atomic(Path(path), doc)


def _write_atomic(path: Path, text: str) -> Path:
    """Temp file in the same folder, then os.replace: readers never see half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
