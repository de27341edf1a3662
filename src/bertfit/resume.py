"""What a run records about how it started (`RUN/source.json`), and the checks `--resume` makes with it.

source.json holds the bertfit version, the command line, and for each data file given by path its
absolute path, size and SHA-256. A resume may then name no data (the recorded files are used), and
is refused when a file changed since the run started or when an option given now differs from the
run's own: silently training on other data, or silently ignoring `--learning-rate 3e-5`, would give
a run folder whose config.yaml does not say what was done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from pathlib import Path

from .config import DataConfig, TrainConfig, option
from . import config
from .errors import BertfitError, ConfigError

SOURCE = "source.json"
SPLITS = ("train", "validation", "test")


def fingerprint(path: Path) -> dict:
    """Path, size and SHA-256 of a data file; a folder (one subfolder per class): of its files in order."""
    path = Path(path).resolve()
    digest, size = hashlib.sha256(), 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as stream:
            digest.update(hashlib.file_digest(stream, "sha256").digest())
        size += f.stat().st_size
    return {"path": str(path), "bytes": size, "sha256": digest.hexdigest()}


def is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def record(out: Path, sources: dict, command: list[str] | None, version: str):
    """Write RUN/source.json for a new run: the data given by path (fingerprinted), the command line."""
    from .classifier import write_atomic

    data = {split: fingerprint(s) if is_path(s) else None for split, s in sources.items() if s is not None}
    write_atomic(out / SOURCE, json.dumps({"bertfit": version, "command": shlex.join(command) if command else None,
                                           "data": data}, indent=2))


def resume_command(out: Path) -> str:
    return shlex.join(["bertfit", "train", "--out", str(out), "--resume"])


def resumed_sources(out: Path, sources: dict) -> dict:
    """The data of a resumed run: what is given now, or the recorded files; a file whose content changed
    since the run started is refused, naming it."""
    path = out / SOURCE
    recorded = json.loads(path.read_text())["data"] if path.exists() else {}
    result = dict(sources)
    for split in SPLITS:
        given, then = sources.get(split), recorded.get(split)
        if given is None and then is not None:
            if not Path(then["path"]).exists():
                raise BertfitError(f"{out} was trained on {then['path']} ({split} data), which is gone: "
                                   "give the data again (the same content) to resume")
            given = result[split] = then["path"]
        if then is None or not is_path(given):
            continue
        now = fingerprint(given)
        if now["sha256"] != then["sha256"]:
            what = ("changed since the run started" if now["path"] == then["path"]
                    else f"is not {then['path']}, the file the run started with")
            raise BertfitError(f"{split} data {given} {what} ({then['bytes']:,} bytes then, {now['bytes']:,} now: "
                               "other content): resuming would train on other data. Start a new run "
                               f"(another {option('out')}, or {option('overwrite', True)})")
    if result.get("train") is None:
        raise BertfitError(f"{out}: no training data given, and the run recorded none to reuse "
                           f"({'in-memory data' if 'train' in recorded else f'no {SOURCE}: an older run'}): "
                           "give the same data again")
    return result


def changed_options(saved_data: dict, saved_train: dict, given: dict) -> list[str]:
    """The options given now whose values differ from the run's own (flag spellings, old -> new)."""
    from .config import split_options

    data_given, train_given = split_options(given)
    changes = []
    for cls, saved, now in ((DataConfig, saved_data, data_given), (TrainConfig, saved_train, train_given)):
        before = cls.from_dict(saved)
        after = cls.from_dict({**saved, **now})
        for f in dataclasses.fields(cls):
            old, new = getattr(before, f.name), getattr(after, f.name)
            if old != new:
                changes.append(f"{option(f.name, new)} (the run has {old})")
    return changes


def check_options(out: Path, saved_data: dict, saved_train: dict, given: dict):
    changes = changed_options(saved_data, saved_train, given)
    if changes:
        how = resume_command(out) if config.COMMAND_LINE else f"fine_tune(out={str(out)!r}, resume=True)"
        raise ConfigError(f"{out} is resumed with its own options; these differ: {'; '.join(changes)}. "
                          f"Drop them to resume ({how}), or start a new run with them")
