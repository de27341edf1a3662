"""Hyperparameter search: an Optuna study over `fine_tune`, then one run with the best parameters.

    bertfit tune train.tsv --validation dev.tsv --trials 20 --out runs/tuned

Each trial fine-tunes on the same train/validation split (the files are read once per process)
without writing anything, reports the validation metric after every epoch, and is pruned when it
falls behind the median of earlier trials at the same epoch. The study lives in an Optuna storage:
`sqlite:///OUT/study.db` by default, or any SQLAlchemy URL; running the same command again
continues the study, and processes on several machines that name the same `--storage` and
`--study` (each with its own `--out`) share it. At the end `OUT` holds a normal run folder trained
with the best parameters found so far, plus `tuning.json` and `tuning.html`.

The search space (default: the BERT paper's grid plus what matters for small models) can be
replaced in the YAML config:

    search_space:
      learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}
      batch_size: {type: categorical, choices: [16, 32]}
      epochs: {type: int, low: 2, high: 4}
    pruner: {type: median, n_startup_trials: 5, n_warmup_steps: 2}   # or hyperband, or none
    start_points:                      # tried first, in this order, unless the study has tried them
      - {learning_rate: 5.0e-5, batch_size: 32, epochs: 3}

Options given explicitly (flags, keyword arguments or YAML keys) are fixed: they leave the
default search space.

The TPE sampler is seeded from `--seed` and the number of trials already in the study, so one
process reproduces its trials. With an explicit `--storage` (the way to run several workers) the
process id is mixed in too, so that workers started together do not try the same points.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import numpy as np

from .config import METRICS, DataConfig, TrainConfig, options_in_signature, split_options
from .errors import BertfitError, ConfigError

DEFAULT_SEARCH_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-4, "log": True},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
    "epochs": {"type": "int", "low": 2, "high": 5},
    "warmup_ratio": {"type": "float", "low": 0.0, "high": 0.2},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    "dropout": {"type": "float", "low": 0.0, "high": 0.2},
}
# n_warmup_steps 2: epochs are reported as steps 1, 2, ..., so trials are judged from their 2nd epoch
# on. On MRPC the first epoch's dev F1 did not separate runs: the best trial (the default recipe) had
# 0.820 there, below the median that pruned two restarts of it with other seeds (bench/RESULTS.md).
DEFAULT_PRUNER = {"type": "median", "n_startup_trials": 5, "n_warmup_steps": 2}
# f1_positive: F1 of the positive class of a binary task (the second label in sorted order, as for roc_auc).
TUNE_METRICS = tuple(METRICS) + (() if "f1_positive" in METRICS else ("f1_positive",))
NOT_TUNABLE = {"metric", "strategy", "export", "checkpoint_every", "keep_checkpoints"}
RUN_FILES = ("run.json", "config.yaml", "weights.safetensors", "vocab.txt", "metrics.json", "report.html", "logs",
             "checkpoints", "saved_model")
MARKER = ".bertfit-tune"


class _DropRetracing(logging.Filter):
    """Each trial loads the model afresh, so TF counts each new tokenizer's single trace as 'retracing'."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


def _quiet_retracing_warning():
    tf_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _DropRetracing) for f in tf_logger.filters):
        tf_logger.addFilter(_DropRetracing())


# -- search space --------------------------------------------------------------------------


def parse_start_points(raw, space: dict) -> list[dict]:
    """Validate `start_points:` (a list of {option: value} inside the search space), for enqueue_trial."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, dict) and p for p in raw):
        raise ConfigError("start_points must be a list of mappings like {learning_rate: 5.0e-5, epochs: 3}")
    points = []
    for i, point in enumerate(raw):
        point = {str(k).replace("-", "_"): v for k, v in point.items()}
        for name, value in point.items():
            where = f"start_points[{i}].{name}"
            spec = space.get(name)
            if spec is None:
                raise ConfigError(f"{where}: not in the search space ({', '.join(sorted(space))})")
            if spec["type"] == "categorical":
                if value not in spec["choices"]:
                    raise ConfigError(f"{where}: {value!r} is not one of the choices {spec['choices']}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not spec["low"] <= value <= spec["high"]:
                raise ConfigError(f"{where}: {value!r} is outside [{spec['low']}, {spec['high']}]")
        points.append(point)
    return points


def parse_search_space(raw, base_train: dict) -> dict:
    """Validate a `search_space:` mapping; returns {option: spec} with normalized specs."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("search_space is empty: give at least one option to tune, e.g. "
                          "search_space: {learning_rate: {type: float, low: 1.0e-5, high: 3.0e-4, log: true}}")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for name, spec in raw.items():
        name = str(name).replace("-", "_")
        where = f"search_space.{name}"
        if name not in train_fields or name in NOT_TUNABLE:
            tunable = sorted(train_fields - NOT_TUNABLE)
            raise ConfigError(f"{where}: not a tunable option (tunable: {', '.join(tunable)})")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping like {{type: float, low: 0.0, high: 0.1}}")
        kind = spec.get("type")
        allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
                   "categorical": {"type", "choices"}}
        if kind not in allowed:
            raise ConfigError(f"{where}: type must be float, int or categorical, not {kind!r}")
        unknown = sorted(set(spec) - allowed[kind])
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for type {kind}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: choices must be a non-empty list")
            if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null")
            values = list(choices)
            norm = {"type": kind, "choices": values}
        else:
            number = int if kind == "int" else (int, float)
            low, high = spec.get("low"), spec.get("high")
            if isinstance(low, bool) or isinstance(high, bool) or not isinstance(low, number) \
                    or not isinstance(high, number):
                raise ConfigError(f"{where}: low and high must be {'integers' if kind == 'int' else 'numbers'}")
            if not low < high:
                raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0")
            step = spec.get("step")
            if step is not None and (log or not isinstance(step, number) or step <= 0):
                raise ConfigError(f"{where}: step must be a positive number, and cannot go with log")
            norm = {"type": kind, "low": low, "high": high, "log": log}
            if step is not None:
                norm["step"] = step
            values = [low, high]
        for value in values:  # the bounds must be valid settings themselves
            try:
                TrainConfig.from_dict({**base_train, name: value})
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"{where}: the value {value!r} is not a valid {name}: {e}") from None
        out[name] = norm
    return out


def suggest(trial, name, spec):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"], step=spec.get("step", 1))
    return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec["log"], step=spec.get("step"))


def make_pruner(raw, max_epochs: int):
    import optuna

    spec = dict(DEFAULT_PRUNER if raw is None else raw) if isinstance(raw, dict) or raw is None else None
    if spec is None:
        raise ConfigError("pruner must be a mapping like {type: median, n_startup_trials: 5}")
    kind = spec.pop("type", "median")
    kinds = {"median": (optuna.pruners.MedianPruner, {"n_startup_trials", "n_warmup_steps", "interval_steps"}),
             "hyperband": (optuna.pruners.HyperbandPruner, {"min_resource", "max_resource", "reduction_factor"}),
             "none": (optuna.pruners.NopPruner, set())}
    if kind not in kinds:
        raise ConfigError(f"pruner type must be median, hyperband or none, not {kind!r}")
    cls, allowed = kinds[kind]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"pruner {kind}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    if kind == "hyperband":
        spec.setdefault("min_resource", 1)
        spec.setdefault("max_resource", max_epochs)
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pruner {kind}: {e}") from None


# -- storage and study -------------------------------------------------------------------


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (an unparsable URL is shown as given)
        return url


def open_storage(url: str):
    """An Optuna RDB storage, or a ConfigError that says why not."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat_interval is "experimental"
                # Heartbeats mark the trials of a killed process as failed, so a re-run does not wait on them.
                # A trial failed so (or found dead by _fail_dead_trials) is queued again with its parameters.
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=180,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except Exception as e:  # noqa: BLE001  (SQLAlchemy, driver and Optuna errors all mean: cannot use it)
            # Workers that start together race to create the tables; the loser retries and finds them.
            if attempt < 5 and any(s in str(e) for s in ("already exists", "locked", "UNIQUE constraint")):
                time.sleep(0.5 + attempt)
                continue
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, ImportError):
                reason = "its database driver is not installed (PostgreSQL: pip install psycopg2-binary; MySQL: pymysql)"
            raise ConfigError(f"cannot open the Optuna storage {_safe_url(url)}: {reason}") from None


def _process_gone(worker: str | None) -> bool:
    """Whether a trial's worker ("host:pid") was a process on this machine that has ended (or whose pid is
    now ours: this process has run no trial yet). Workers on other machines are left to the heartbeat."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _fail_dead_trials(study, storage, log):
    """Trials left RUNNING by a killed process of this machine are marked failed and queued again, now
    (the heartbeat would wait out its grace period, and the rerun would start without them)."""
    import optuna

    retry = storage.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not _process_gone(worker):
            continue
        storage.set_trial_user_attr(trial._trial_id, "error", f"its process ({worker}) ended during the trial")
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
        log(f"trial {trial.number}: its process ({worker}) ended during the trial: marked failed"
            + (f", its parameters queued again ({_format_params(trial.params)})" if trial.params else ""))
        if trial.params:
            again = copy.deepcopy(storage.get_trial(trial._trial_id))
            again.user_attrs.pop("error")  # the copy's attributes are the queued trial's
            retry(study, again)


def _remove_dead_staging(out: Path):
    """A final run's staging folder left by a killed process of this machine."""
    for staging in out.glob(".final-run.tmp*"):
        pid = staging.name.removeprefix(".final-run.tmp")
        if staging.is_dir() and _process_gone(f"{socket.gethostname()}:{pid}"):
            shutil.rmtree(staging, ignore_errors=True)


def _check_out(out: Path, overwrite: bool):
    """OUT may be new, empty, a tuning folder (continued), or with overwrite a bertfit run folder."""
    if out.exists() and not out.is_dir():
        raise BertfitError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()) or (out / MARKER).exists() or (out / "study.db").exists():
        return
    is_run = (out / "config.yaml").exists() and ((out / "run.json").exists() or (out / "checkpoints").exists())
    if not is_run:
        raise BertfitError(f"{out} is not empty and holds neither a bertfit tuning nor a run: choose another --out")
    if not overwrite:
        raise BertfitError(f"{out} holds a bertfit run: pass --overwrite to replace it with the tuned run, "
                           "or choose another --out")


def _make_out(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("bertfit tune folder: the study, tuning.json/html and the run with the best parameters\n")
    except OSError as e:
        raise BertfitError(f"cannot write to the output folder {out}: {e.strerror}") from None


# -- objective ---------------------------------------------------------------------------


def metric_value(metrics: dict, metric: str, labels) -> float:
    """The tuned value from a metrics dict (classification_metrics' keys; `loss` is log_loss)."""
    if metric == "loss":
        value = metrics["log_loss"]
    elif metric == "f1_positive":
        value = metrics["per_class"][str(labels[1])]["f1"]
    else:
        value = metrics.get(metric)
    return float("nan") if value is None else float(value)


def tune(data, validation=None, *, trials=20, timeout=None, storage=None, study=None, out, config_file=None,
         overwrite=False, start_points=None, log=print, **options):
    """Search hyperparameters with Optuna, then train a run folder in `out` with the best ones.

    `options` are fine_tune's flat options (DataConfig and TrainConfig names); those given are
    fixed, the rest of the search space is tuned. `search_space` and `pruner` may be given here
    too, in the YAML config's form. `start_points` (a list of {option: value}) are
    tried first, those the study has not tried yet. Returns the final run's Classifier.
    """
    try:
        import optuna
    except ImportError:
        raise BertfitError("bertfit tune needs Optuna: pip install optuna") from None

    from . import training
    from .data import Examples, LabelVocab, dataset_options, read_examples, stratified_split

    if out is None:
        raise ConfigError("tune needs out (the folder for the study and the final run)")
    out = Path(out)
    if trials is None or int(trials) < 0:
        raise ConfigError("trials must be 0 or more")
    trials = int(trials)
    if timeout is not None and timeout <= 0:
        raise ConfigError("timeout must be a positive number of seconds")

    # Options: the YAML file, then explicit options (search_space and pruner included) over it.
    flat = training.load_config_file(config_file) if config_file else {}
    flat.update({k: v for k, v in options.items() if v is not None})
    flat.update(dataset_options(data))  # a tuple dataset's parts are (text, [pair,] label)
    has_space = "search_space" in flat
    raw_space = flat.pop("search_space", None)
    raw_pruner = flat.pop("pruner", None)
    raw_start = start_points if start_points is not None else flat.pop("start_points", None)
    flat.pop("start_points", None)
    metric = flat.pop("metric", "auto")
    if metric != "auto" and metric not in TUNE_METRICS:
        raise ConfigError(f"unknown metric {metric!r}: choose auto or one of {', '.join(TUNE_METRICS)}")
    data_opts, train_opts = split_options(flat)
    data_config = DataConfig.from_dict(data_opts)
    base = TrainConfig.from_dict(train_opts)
    if base.strategy == "multi-worker":
        raise ConfigError("tune runs its trials one after another in one process: instead of --strategy "
                          "multi-worker, start `bertfit tune` on each machine with the same --storage and --study")
    if has_space:
        space = parse_search_space(raw_space, train_opts)
    else:
        fixed = sorted(set(DEFAULT_SEARCH_SPACE) & set(train_opts))
        space = parse_search_space({k: v for k, v in DEFAULT_SEARCH_SPACE.items() if k not in fixed}, train_opts)
        if fixed:
            log(f"fixed by your options, not tuned: {', '.join(f'{k}={train_opts[k]}' for k in fixed)}")
    ignored = sorted(set(space) & set(train_opts))
    if ignored:
        log(f"tuned by search_space, so these options are ignored: {', '.join(ignored)}")
    first_points = parse_start_points(raw_start, space)
    epochs = space.get("epochs")
    max_epochs = base.epochs if epochs is None else int(max(epochs["choices"]) if "choices" in epochs else epochs["high"])
    pruner = make_pruner(raw_pruner, max_epochs)

    # Read the data once; every trial trains on the same split.
    def read(source):
        if source is None or isinstance(source, Examples):
            return source
        return read_examples(source, **data_config.read_options())

    train_ex, val_ex = read(data), read(validation)
    vocab = LabelVocab.from_labels(train_ex.labels, multilabel=data_config.multilabel, source=train_ex.source)
    labels = vocab.names  # multi-label by the options or by the labels themselves (lists)
    if metric == "auto":
        metric = "f1_macro" if vocab.multilabel else "accuracy"
    if metric == "f1_positive" and vocab.multilabel:
        raise ConfigError("metric f1_positive is for binary tasks; use f1_macro for multi-label")
    # Epochs are picked by the tuned metric where fine_tune knows it (f1_positive: by f1_macro until it does).
    train_metric = metric if metric in METRICS else "f1_macro"
    direction = "minimize" if metric == "loss" else "maximize"
    if metric == "f1_positive" and len(labels) != 2:
        raise ConfigError(f"metric f1_positive is for binary tasks; this one has {len(labels)} labels")
    if metric in ("roc_auc", "pr_auc") and len(labels) != 2:
        raise ConfigError(f"metric {metric} is defined for binary tasks only")
    if val_ex is None:
        train_ex, val_ex = stratified_split(train_ex, fraction=base.validation_split, seed=base.seed)
        log(f"no validation data: holding out a stratified {base.validation_split:.0%} of the training data "
            f"({len(val_ex)} examples, seed {base.seed}) for every trial")

    _check_out(out, overwrite)
    shared = storage is not None
    if not shared:
        _make_out(out)
    storage_url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study or out.resolve().name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_retracing_warning()
    rdb = open_storage(storage_url)
    _make_out(out)
    try:
        the_study = optuna.create_study(storage=rdb, study_name=study_name, direction=direction, pruner=pruner,
                                        load_if_exists=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot create or load the study {study_name!r} in {_safe_url(storage_url)}: {e}") from None
    if the_study.direction.name.lower() != direction:
        raise ConfigError(f"study {study_name!r} was created to {the_study.direction.name.lower()} its metric; "
                          f"metric {metric} needs {direction}: choose another --study")
    known = the_study.user_attrs.get("metric")
    if known is None:
        the_study.set_user_attr("metric", metric)
    elif known != metric:
        raise ConfigError(f"study {study_name!r} tunes metric {known}, not {metric}: pass --metric {known} "
                          "or choose another --study")
    _fail_dead_trials(the_study, rdb, log)
    _remove_dead_staging(out)
    n_before = len(the_study.trials)
    # Points the study has already tried (in any state) are skipped, so a resumed study takes
    # the new ones only; a worker starting at the same time may enqueue them too: skipped then.
    for point in first_points:
        the_study.enqueue_trial(point, skip_if_exists=True)
    # Seeded TPE: one process reproduces its trials from --seed. Processes that share a storage
    # mix in their process id, so that workers started together do not try the same points.
    sampler_seed = (base.seed * 1_000_003 + n_before + (os.getpid() << 16 if shared else 0)) % 2**32
    the_study.sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)

    fixed_options = {**flat, "metric": train_metric}
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial):
        import keras

        trial.set_user_attr("worker", worker)  # first: a trial whose process is killed is known by it
        params = {name: suggest(trial, name, spec) for name, spec in space.items()}
        log(f"trial {trial.number}: {_format_params(params)}")
        keras.backend.clear_session()  # drop the previous trial's graphs

        def on_epoch_end(epoch, metrics):
            value = metric_value(metrics, metric, labels)
            if math.isfinite(value):
                trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4f} after epoch {epoch}")

        start = time.perf_counter()
        try:
            clf = training.fine_tune(train_ex, val_ex, out=None, log=lambda m: log(f"  [trial {trial.number}] {m}"),
                                     on_epoch_end=on_epoch_end, **{**fixed_options, **params})
        except optuna.TrialPruned as e:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
            log(f"trial {trial.number}: pruned ({e})")
            raise
        except ConfigError:
            raise
        except BertfitError as e:  # e.g. the loss diverged at this learning rate: a failed trial, not a failed study
            log(f"trial {trial.number}: failed: {e}")
            trial.set_user_attr("error", str(e))
            return float("nan")
        m = clf.metrics
        value = metric_value(m, metric, labels)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        trial.set_user_attr("best_epoch", m.get("best_epoch"))
        trial.set_user_attr("history", [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in m["history"]])
        return value

    def report(study_, frozen):
        try:
            best = study_.best_trial
            tail = f"; best so far: trial {best.number}, {metric} {best.value:.4f}"
        except ValueError:
            tail = ""
        if frozen.state == optuna.trial.TrialState.COMPLETE:
            log(f"trial {frozen.number}: {metric} {frozen.value:.4f}{tail}")

    log(f"study {study_name!r} in {_safe_url(storage_url)}: {n_before} trial(s) so far; running {trials} more"
        f"{f' (at most {timeout:g}s)' if timeout else ''}, {direction} validation {metric}")
    if trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            the_study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[report], gc_after_trial=True)

    complete = [t for t in the_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise BertfitError(f"study {study_name!r} has no completed trial yet: run more --trials")
    best = the_study.best_trial
    log(f"best: trial {best.number}, validation {metric} {best.value:.4f}: {_format_params(best.params)}; "
        f"training the final run in {out}")
    clf = _final_run(out, train_ex, val_ex, {**fixed_options, **best.params}, log)
    final_value = metric_value(clf.metrics, metric, labels)

    summary = _summary(the_study, metric, direction, space, storage_url, best, final_value, clf.metrics)
    from .classifier import write_atomic

    write_atomic(out / "tuning.json", json.dumps(summary, indent=2, default=_json_default))
    write_atomic(out / "tuning.html", tuning_html(summary))
    log(f"final run: validation {metric} {final_value:.4f} (best trial: {best.value:.4f}); "
        f"{out / 'tuning.html'}, {out / 'tuning.json'}")
    clf.tuning = summary
    return clf


options_in_signature(tune)


def _final_run(out: Path, train_ex, val_ex, options: dict, log):
    """fine_tune into a staging folder, then move its files into OUT (run.json last: atomic enough)."""
    from . import training

    staging = out / f".final-run.tmp{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    clf = training.fine_tune(train_ex, val_ex, out=staging, log=log, **options)
    (out / "run.json").unlink(missing_ok=True)  # from here on OUT does not look like a complete run
    entries = sorted(p.name for p in staging.iterdir())
    for name in set(RUN_FILES) | set(entries):
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    for name in sorted(entries, key=lambda n: n == "run.json"):
        os.replace(staging / name, out / name)
    staging.rmdir()
    return clf


def _format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _finite(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def importances(trials, space_names) -> tuple[str, dict]:
    """(method, {param: importance}) from completed trials: Optuna's evaluator with 10+ trials,
    else |Spearman rank correlation| with the value (3+ trials), else nothing."""
    import optuna

    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
                and math.isfinite(t.value)]
    if len(complete) >= 10:
        try:
            study = optuna.create_study(direction="maximize")
            study.add_trials(complete)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return "optuna.importance (PED-ANOVA)", dict(optuna.importance.get_param_importances(study))
        except Exception:  # noqa: BLE001  (e.g. no parameter common to all trials): the fallback below
            pass
    if len(complete) < 3:
        return f"too few completed trials ({len(complete)}) to estimate importances", {}
    values = np.array([t.value for t in complete])
    out = {}
    for name in space_names:
        xs = [t.params.get(name) for t in complete]
        if any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in xs):
            continue
        x = np.array(xs, float)
        if np.ptp(x) == 0 or np.ptp(values) == 0:
            out[name] = 0.0
            continue
        rx, ry = _ranks(x), _ranks(values)
        out[name] = float(abs(np.corrcoef(rx, ry)[0, 1]))
    method = f"|Spearman rank correlation| with the value ({len(complete)} trials; Optuna's estimate needs 10)"
    return method, dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _ranks(x):
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def _summary(study, metric, direction, space, storage_url, best, final_value, final_metrics) -> dict:
    trials = []
    for t in study.trials:
        trials.append({
            "number": t.number,
            "state": t.state.name,
            "value": _finite(t.value),
            "params": t.params,
            "intermediate": {str(k): _finite(v) for k, v in sorted(t.intermediate_values.items())},
            "seconds": t.user_attrs.get("seconds"),
            "best_epoch": t.user_attrs.get("best_epoch"),
            "worker": t.user_attrs.get("worker"),
            "error": t.user_attrs.get("error"),
        })
    method, imp = importances(study.trials, list(space))
    states = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    return {
        "study": study.study_name,
        "storage": _safe_url(storage_url),
        "metric": metric,
        "direction": direction,
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "final_run_value": _finite(final_value),
        "final_run_metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float, str)) and k != "split"},
        "n_trials": len(trials),
        "states": states,
        "search_space": space,
        "importance_method": method,
        "importances": imp,
        "trials": trials,
    }


# -- the HTML report -----------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v, digits=4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if (abs(v) < 1e-3 and v != 0) or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return _e(v)


def _scale(lo, hi, a, b):
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def _ticks(lo, hi, count=5, integer=False):
    """Round-number ticks (1, 2, 5 x 10^k) inside [lo, hi]; whole numbers only if integer."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1.0) if integer else step
    first = math.ceil(lo / step - 1e-9) * step
    return [round(t, 12) for t in np.arange(first, hi + step * 1e-6, step)]


def _axes(svg, x0, x1, y0, y1, left, top, pw, ph, xlabel, ylabel, width, height):
    sx, sy = _scale(x0, x1, left, left + pw), _scale(y0, y1, top + ph, top)
    for t in _ticks(y0, y1):
        svg.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t + 0.0:.4g}</text>')
    for t in _ticks(x0, x1, count=8, integer=True):
        svg.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{int(t)}</text>')
    svg.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>'
               f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" class="axis">{_e(xlabel)}</text>'
               f'<text transform="translate(14 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" class="axis">'
               f'{_e(ylabel)}</text>')
    return sx, sy


def _history_svg(summary, width=520, height=300) -> str:
    """Each trial's value (pruned: its last reported value, hollow) and the best so far."""
    left, top, pw, ph = 56, 10, width - 68, height - 52
    pts = []
    for t in summary["trials"]:
        if t["state"] == "COMPLETE" and t["value"] is not None:
            pts.append((t["number"], t["value"], "complete"))
        elif t["state"] == "PRUNED" and t["intermediate"]:
            last = [v for v in t["intermediate"].values() if v is not None]
            if last:
                pts.append((t["number"], last[-1], "pruned"))
    if not pts:
        return '<p class="note">No trial has a value yet.</p>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    pad = (max(ys) - min(ys)) * 0.05 or 0.05
    svg = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    sx, sy = _axes(svg, min(xs) - 0.5, max(xs) + 0.5, min(ys) - pad, max(ys) + pad, left, top, pw, ph,
                   "trial", summary["metric"], width, height)
    better = min if summary["direction"] == "minimize" else max
    best, line = None, []
    for n, v, kind in sorted(pts):
        if kind == "complete":
            best = v if best is None else better(best, v)
        if best is not None:
            line.append(f"{sx(n):.1f},{sy(best):.1f}")
    svg.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#e6550d" stroke-width="1.8"/>')
    for n, v, kind in pts:
        style = 'fill="#3182bd"' if kind == "complete" else 'fill="none" stroke="#999" stroke-width="1.5"'
        svg.append(f'<circle cx="{sx(n):.1f}" cy="{sy(v):.1f}" r="4" {style}><title>trial {n}: {v:.4f} ({kind})</title></circle>')
    svg.append("</svg>")
    legend = ('<div class="legend"><span><i style="background:#3182bd"></i>completed trial</span>'
              '<span><i style="background:#fff;border:1px solid #999"></i>pruned (last reported value)</span>'
              '<span><i style="background:#e6550d"></i>best so far</span></div>')
    return "".join(svg) + legend


def _curves_svg(summary, width=520, height=300) -> str:
    """Validation metric per epoch of every trial: what the pruner compared."""
    series = [(t["number"], t["state"], [(int(k), v) for k, v in t["intermediate"].items() if v is not None])
              for t in summary["trials"]]
    series = [s for s in series if s[2]]
    if not series:
        return '<p class="note">No trial has reported an epoch yet.</p>'
    xs = [e for _, _, s in series for e, _ in s]
    ys = [v for _, _, s in series for _, v in s]
    pad = (max(ys) - min(ys)) * 0.05 or 0.05
    left, top, pw, ph = 56, 10, width - 68, height - 52
    svg = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    sx, sy = _axes(svg, min(xs) - 0.2, max(xs) + 0.2, min(ys) - pad, max(ys) + pad, left, top, pw, ph,
                   "epoch", summary["metric"], width, height)
    for n, state, s in sorted(series, key=lambda s: s[0] == summary["best_trial"]):
        color = "#e6550d" if n == summary["best_trial"] else ("#3182bd" if state == "COMPLETE" else "#bbb")
        pts = " ".join(f"{sx(e):.1f},{sy(v):.1f}" for e, v in s)
        dash = ' stroke-dasharray="4,3"' if state == "PRUNED" else ""
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"{dash}>'
                   f'<title>trial {n} ({state.lower()})</title></polyline>')
        svg.extend(f'<circle cx="{sx(e):.1f}" cy="{sy(v):.1f}" r="2.5" fill="{color}"/>' for e, v in s)
    svg.append("</svg>")
    legend = ('<div class="legend"><span><i style="background:#e6550d"></i>best trial</span>'
              '<span><i style="background:#3182bd"></i>completed</span>'
              '<span><i style="background:#bbb"></i>pruned (dashed) or failed</span></div>')
    return "".join(svg) + legend


def _importance_html(summary) -> str:
    imp = summary["importances"]
    if not imp:
        return f'<p class="note">{_e(summary["importance_method"])}.</p>'
    top = max(imp.values()) or 1.0
    rows = "".join(
        f'<tr><td>{_e(k)}</td><td><div class="bar" style="width:{300 * v / top:.0f}px"></div></td>'
        f'<td class="n">{v:.3f}</td></tr>' for k, v in imp.items())
    return f'<table class="imp">{rows}</table><p class="note">{_e(summary["importance_method"])}.</p>'


def _trials_table(summary) -> str:
    names = list(summary["search_space"])
    for t in summary["trials"]:
        names += [k for k in t["params"] if k not in names]
    reverse = summary["direction"] == "maximize"
    done = sorted((t for t in summary["trials"] if t["value"] is not None), key=lambda t: t["value"], reverse=reverse)
    rest = sorted((t for t in summary["trials"] if t["value"] is None), key=lambda t: t["number"])
    head = "".join(f"<th>{_e(h)}</th>" for h in ["trial", "state", summary["metric"], *names, "epochs reported",
                                                  "best epoch", "seconds", "worker"])
    rows = []
    for t in done + rest:
        cls = ' class="best"' if t["number"] == summary["best_trial"] else ""
        note = f' title="{_e(t["error"])}"' if t.get("error") else ""
        cells = [str(t["number"]), f'<span{note}>{_e(t["state"].lower())}</span>', _fmt(t["value"]),
                 *[_fmt(t["params"].get(n)) for n in names], str(len(t["intermediate"])),
                 _fmt(t["best_epoch"]), _fmt(t["seconds"], 1) if t["seconds"] is not None else "", _e(t["worker"] or "")]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="scroll"><table class="num"><tr>{head}</tr>{"".join(rows)}</table></div>'


def tuning_html(summary: dict) -> str:
    """A self-contained page (inline SVG and CSS, no scripts, nothing fetched)."""
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items()))
    cards = [("best " + summary["metric"], _fmt(summary["best_value"])), ("best trial", summary["best_trial"]),
             ("final run " + summary["metric"], _fmt(summary["final_run_value"])), ("trials", summary["n_trials"])]
    cards_html = "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cards)
    best = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v, 6)}</td></tr>" for k, v in summary["best_params"].items())
    import yaml

    from .evaluation import REPORT_CSS

    space = "\n".join(f"  {k}: {yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip()}"
                      for k, v in summary["search_space"].items())
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<title>bertfit tune: {_e(summary["study"])}</title><style>{REPORT_CSS}</style></head><body>'
        f'<h1>bertfit tune: {_e(summary["study"])}</h1>'
        f'<p>{summary["direction"]} validation <b>{_e(summary["metric"])}</b>; {_e(states)}; '
        f'storage <code>{_e(summary["storage"])}</code></p>'
        f'<div class="cards">{cards_html}</div>'
        f'<h2>Best parameters</h2><table>{best}</table>'
        '<p class="note">The run folder beside this page was trained with them.</p>'
        '<h2>Optimisation history</h2><div class="figs">'
        f'<figure><figcaption>Value per trial</figcaption>{_history_svg(summary)}</figure>'
        f'<figure><figcaption>Validation {_e(summary["metric"])} per epoch</figcaption>{_curves_svg(summary)}</figure>'
        '</div>'
        f'<h2>Parameter importances</h2>{_importance_html(summary)}'
        f'<h2>Trials</h2>{_trials_table(summary)}'
        f'<h2>Search space</h2><pre>search_space:\n{_e(space)}</pre>'
        '</body></html>'
    )
