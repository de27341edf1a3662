"""`bertfit inspect`: a data file's columns, labels and token lengths before training, with the column
options to pass when its names are not bertfit's defaults, and warnings about labels that would
mislead a training run (one class, imbalance, labels too rare to validate on)."""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter

import numpy as np

from . import config
from .config import option as opt

# Column names a label is often given, in the order they are preferred.
_LABEL_NAMES = ("label", "labels", "class", "category", "target", "y", "intent", "sentiment", "emotion", "topic",
                "tag", "tags", "quality")
IMBALANCE_RATIO = 4  # largest / smallest class at which accuracy starts to flatter the majority
RARE_EXAMPLES = 5  # a label with fewer examples may be missing from a validation split


def _as_text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _missing(value) -> bool:
    value = _as_text(value)
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip() in ("", "nan", "NaN"))


def _is_number(value) -> bool:
    value = _as_text(value)
    return isinstance(value, (int, float)) or (isinstance(value, str) and bool(re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value)))


def guess_columns(peek: dict) -> dict:
    """{'text_column', 'pair_column', 'label_column', 'label_delimiter'} as far as the sampled values tell.

    Text: the column of strings (not numbers) with the longest mean length; a second such column at
    least half as long, both sentences (20+ characters), makes a pair. Label: of the other columns with
    no missing value and at most half as many distinct values as rows, the one with a usual label name,
    else (of those with two or more values where any has) the one whose value changes most often from
    row to row, then the one with the fewest distinct values."""
    names, values = peek["names"], peek["values"]
    texts = {}
    for name in names:
        present = [_as_text(v) for v in values[name] if not _missing(v)]
        if present and all(isinstance(v, str) for v in present) and not all(_is_number(v) for v in present):
            texts[name] = sum(len(v) for v in present) / len(values[name])
    guess = {}
    ranked = sorted(texts, key=lambda n: -texts[n])
    if ranked:
        guess["text_column"] = ranked[0]
        if len(ranked) > 1 and texts[ranked[1]] >= 20 and texts[ranked[1]] >= texts[ranked[0]] / 2:
            first, second = sorted(ranked[:2], key=names.index)
            guess.update(text_column=first, pair_column=second)
    rows = len(next(iter(values.values()), []))
    candidates = {}
    for name in names:
        if name in (guess.get("text_column"), guess.get("pair_column")) or any(_missing(v) for v in values[name]):
            continue
        cells = [tuple(v) if isinstance(v, list) else _as_text(v) for v in values[name]]
        distinct = len(set(cells))
        if distinct <= max(2, rows // 2):
            candidates[name] = distinct
    named = [n for n in _LABEL_NAMES for c in candidates if c.lower() == n]
    several = {n: d for n, d in candidates.items() if d > 1} or candidates
    # Labels interleave in a shuffled file; a column that groups rows (CoLA's source) changes rarely.
    changes = {n: sum(a != b for a, b in zip(values[n], values[n][1:])) for n in several}
    label = named[0] if named else min(several, key=lambda n: (-changes[n], several[n], names.index(n))) if several else None
    if label is not None:
        guess["label_column"] = next(c for c in candidates if c == label or c.lower() == label)
        cells = [_as_text(v) for v in values[guess["label_column"]]]
        if sum(isinstance(c, str) and "," in c for c in cells) >= max(1, len(cells) // 20):
            guess["label_delimiter"] = ","
    return guess


def _default_resolves(names, option) -> bool:
    from .data import _DEFAULT_LABEL, _DEFAULT_TEXT

    return any(n in names for n in (_DEFAULT_TEXT if option == "text_column" else (_DEFAULT_LABEL,)))


def inspect_data(path, *, model="minilm-l6", max_length=128, **read_options) -> dict:
    from .checkpoints import read_checkpoint
    from .data import peek_columns, read_examples
    from .tokenization import BertTokenizer

    peek = peek_columns(path, **{k: read_options.get(k) for k in ("format", "header", "quoting")},
                        encoding=read_options.get("encoding") or "utf-8")
    options, guessed = {k: v for k, v in read_options.items() if v is not None}, {}
    labelled = peek is None  # a folder's labels are its subfolders' names
    if peek is not None:
        guess = guess_columns(peek)
        if "text_column" not in options and not _default_resolves(peek["names"], "text_column"):
            guessed.update({k: guess[k] for k in ("text_column", "pair_column") if k in guess})
        label_given = any(options.get(k) for k in ("label_column", "label_columns"))
        if not label_given and not _default_resolves(peek["names"], "label_column"):
            guessed.update({k: guess[k] for k in ("label_column", "label_delimiter")
                            if k in guess and k not in options})
        labelled = label_given or _default_resolves(peek["names"], "label_column") or "label_column" in guessed
        if guessed and not peek["header"]:
            guessed["header"] = False
        options.update(guessed)
    # Without a label column (a file to predict on) the texts alone are inspected.
    examples = read_examples(path, require_labels=labelled, **options)
    _, _, vocab, lower_case, _ = read_checkpoint(model)
    tokenizer = BertTokenizer(vocab, lower_case=True if lower_case is None else lower_case)
    lengths = []
    for start in range(0, len(examples), 2048):
        a = tokenizer.tokenize(examples.texts[start:start + 2048]).row_lengths().numpy()
        if examples.pairs is not None:
            b = tokenizer.tokenize(examples.pairs[start:start + 2048]).row_lengths().numpy()
            lengths.append(a + b + 3)
        else:
            lengths.append(a + 2)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, int)
    counts = Counter()
    for label in examples.labels or []:
        counts.update(label if isinstance(label, list) else [label])
    labels = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    multilabel_rows = sum(1 for x in examples.labels or [] if isinstance(x, list) and len(x) > 1)
    pct = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)} if len(lengths) else {}
    columns = [] if peek is None else [
        {"name": n, "type": peek["types"][n],
         "example": next((str(_as_text(v)) for v in peek["values"][n] if not _missing(v)), None)}
        for n in peek["names"]]
    return {
        "source": str(path),
        "rows": len(examples),
        "pairs": examples.pairs is not None,
        "columns": columns,
        "guessed": {k: v for k, v in guessed.items() if k != "header"},
        "guessed_options": guessed,
        "labels": labels,
        "multilabel_rows": multilabel_rows,
        "tokens": {"mean": round(float(lengths.mean()), 1) if len(lengths) else 0, **pct,
                   "max": int(lengths.max()) if len(lengths) else 0},
        "max_length": max_length,
        "truncated_share": round(float((lengths > max_length).mean()), 4) if len(lengths) else 0.0,
        "warnings": label_warnings(labels, multilabel=multilabel_rows > 0 or any(
            isinstance(x, list) for x in examples.labels or [])),
    }


def label_warnings(labels: dict, multilabel=False) -> list[str]:
    """What about these label counts would make a training run mislead, and the option that helps."""
    if not labels:
        return []
    if len(labels) == 1 and not multilabel:
        name = next(iter(labels))
        return [f"only one label ({name!r}): a classifier needs examples of two or more; check "
                f"{opt('label_column')}, or add examples of the other classes"]
    warnings = []
    (big, most), (small, fewest) = next(iter(labels.items())), list(labels.items())[-1]
    if not multilabel and most >= IMBALANCE_RATIO * fewest:
        warnings.append(
            f"imbalanced labels: {big!r} has {most / fewest:.1f} times the examples of {small!r}, so accuracy "
            f"rewards answering {big!r}: choose the best epoch by {opt('metric', 'f1_macro')}, and consider "
            f"{opt('class_weight', 'balanced')}")
    rare = [name for name, n in labels.items() if n < RARE_EXAMPLES]
    if rare:
        shown = ", ".join(map(repr, rare[:10])) + (f" and {len(rare) - 10} more" if len(rare) > 10 else "")
        warnings.append(f"fewer than {RARE_EXAMPLES} examples of {shown}: a validation split may hold none, "
                        "and the model can hardly learn them")
    return warnings


def format_report(r: dict) -> str:
    lines = [f"{r['source']}: {r['rows']} rows{' (sentence pairs)' if r['pairs'] else ''}"]
    if r["columns"]:
        shown = []
        for c in r["columns"]:
            example = c["example"] if c["example"] is None or len(c["example"]) <= 40 else c["example"][:39] + "…"
            shown.append(f"  {c['name']!r:<24}{c['type']:<10}e.g. {example!r}")
        lines += ["columns:", *shown]
    if r["guessed"]:
        used = ", ".join(f"{k.removesuffix('_column')} {v!r}" for k, v in r["guessed"].items())
        flags = " ".join(opt(k, v if isinstance(v, bool) or not config.COMMAND_LINE else shlex.quote(str(v)))
                         for k, v in r["guessed_options"].items())
        lines.append(f"guessed {used}: to train on these, pass {flags}")
    if r["labels"]:
        total = sum(r["labels"].values())
        lines.append(f"labels ({len(r['labels'])}):")
        lines += [f"  {name:<24}{n:>8}  {n / total:6.1%}" for name, n in r["labels"].items()]
        if r["multilabel_rows"]:
            lines.append(f"rows with several labels: {r['multilabel_rows']}")
    t = r["tokens"]
    lines.append("tokens per input ([CLS]/[SEP] included): " + "  ".join(f"{k} {v}" for k, v in t.items()))
    lines.append(f"max_length {r['max_length']} truncates {r['truncated_share']:.1%} of the inputs")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)
