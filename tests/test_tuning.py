"""`bertfit tune`: an Optuna study over fine_tune on a tiny BERT: the run folder and report, a
continued study, two processes sharing one SQLite study, pruning, and bad input (exit 2)."""

import json
import os
import sys

import pytest

import bertfit
from bertfit.cli import main
from conftest import run_together, sentiment_rows, write_tsv

FAST = dict(max_length=32, export=False)
# Learning rates at which the tiny random BERT learns in 2 epochs; batch sizes that keep trials short.
SPACE = """\
epochs: 2
search_space:
  learning_rate: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  batch_size: {type: categorical, choices: [16, 32]}
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune-data")
    (d / "space.yaml").write_text(SPACE)
    return (write_tsv(d / "train.tsv", ["text", "label"], sentiment_rows(192, seed=1)),
            write_tsv(d / "dev.tsv", ["text", "label"], sentiment_rows(48, seed=2)), str(d / "space.yaml"))


def _trials(out):
    return json.loads((out / "tuning.json").read_text())["trials"]


def test_study_prunes_writes_run_and_report_and_continues(tiny_model, files, tmp_path):
    import optuna

    from bertfit.tuning import tune

    train, dev, space = files
    out = tmp_path / "tuned"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"  # the default storage of --out tuned, study name "tuned"
    # The search space and pruner as keyword arguments (the YAML config's form; the CLI tests use the file).
    lr_space = {"learning_rate": {"type": "float", "low": 1.0e-9, "high": 1.0, "log": True}}
    pruner = {"type": "median", "n_startup_trials": 1}
    # The constructed case: a trial whose validation loss stays near ln 2, then one whose learning
    # rate throws it far above that (the median of the trials before it) after epoch 1: pruned there.
    study = optuna.create_study(storage=storage, study_name="tuned", direction="minimize")
    for lr in (3e-3, 1.0):
        study.enqueue_trial({"learning_rate": lr})
    recipe = dict(model=tiny_model, metric="loss", epochs=2, warmup_ratio=0.0, batch_size=16, **FAST)
    clf = tune(train, dev, trials=2, out=out, search_space=lr_space, pruner=pruner, log=lambda m: None, **recipe)

    trials = optuna.load_study(study_name="tuned", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert [len(t.intermediate_values) for t in trials] == [2, 1]  # one report per epoch; pruned after 1
    assert trials[1].intermediate_values[1] > trials[0].intermediate_values[1]

    summary = json.loads((out / "tuning.json").read_text())
    assert summary["n_trials"] == 2 and summary["metric"] == "loss" and summary["direction"] == "minimize"
    assert summary["study"] == "tuned" and summary["storage"] == f"sqlite:///{(out / 'study.db').resolve()}"
    assert summary["states"] == {"COMPLETE": 1, "PRUNED": 1}
    assert summary["best_params"] == {"learning_rate": 3e-3} and summary["best_trial"] == 0
    # The final run was trained with the best parameters: the same seed gives the best trial's value.
    assert summary["final_run_value"] == pytest.approx(summary["best_value"], abs=1e-6)
    assert clf.metrics["log_loss"] == pytest.approx(summary["best_value"], abs=1e-6)

    page = (out / "tuning.html").read_text()
    for part in ("Optimisation history", "Parameter importances", "Trials", "<svg", "learning_rate", "pruned"):
        assert part in page, part
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained, offline

    # A normal, loadable run folder with the best parameters.
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
    for name in ("config.yaml", "weights.safetensors", "metrics.json", "report.html"):
        assert (out / name).exists(), name
    assert bertfit.load(out).train_config.learning_rate == 3e-3

    # Running tune on OUT again continues the study (here with another search space: a sampled
    # trial, 3 in all) and replaces the final run.
    code = main(["tune", train, "--validation", dev, "--trials", "1", "--out", str(out), "--config", space,
                 "--model", tiny_model, "--metric", "loss", "--epochs", "2", "--max-length", "32", "--no-export"])
    assert code == 0
    trials = _trials(out)
    assert [t["number"] for t in trials] == [0, 1, 2] and trials[2]["state"] == "COMPLETE"
    assert set(trials[2]["params"]) == {"learning_rate", "batch_size"}  # from space.yaml this time
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
    assert not list(out.glob(".final-run.tmp*"))


def test_a_killed_trial_is_failed_and_tried_again(tiny_model, files, tmp_path):
    """kill -9 during a trial, then tune again at once: the killed trial is marked failed (not left
    RUNNING through the rerun), its parameters are the rerun's first trial, and the staging folder
    of a killed final run is removed."""
    import signal
    import subprocess
    import time

    import optuna

    from bertfit.tuning import tune

    train, dev, space = files
    out = tmp_path / "out"
    storage = f"sqlite:///{out / 'study.db'}"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bertfit.cli", "tune", train, "--validation", dev, "--trials", "3",
                             "--out", str(out), "--config", space, "--model", tiny_model, "--epochs", "500",
                             "--max-length", "32", "--no-export"], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    try:
        deadline = time.monotonic() + 120
        running = []
        while not running and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if (out / "study.db").exists():
                try:
                    trials = optuna.load_study(study_name="out", storage=storage).trials
                except Exception:  # noqa: BLE001  (the tables are still being made)
                    continue
                running = [t for t in trials if t.state.name == "RUNNING" and len(t.params) == 2]
        assert running, (tmp_path / "killed.log").read_text()[-2000:]
        time.sleep(1.0)  # inside fine_tune
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    killed = running[0]
    (out / f".final-run.tmp{proc.pid}").mkdir()  # as a final run killed mid-way leaves it

    messages = []
    tune(train, dev, trials=1, out=out, config_file=space, model=tiny_model, log=messages.append, **FAST)
    trials = optuna.load_study(study_name="out", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert f":{proc.pid}) ended during the trial" in trials[0].user_attrs["error"]
    assert trials[1].params == killed.params and "error" not in trials[1].user_attrs
    assert any("marked failed, its parameters queued again" in m for m in messages), messages
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
    assert not list(out.glob(".final-run.tmp*"))


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tiny_model, files, tmp_path):
    train, dev, space = files
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    commands = [[sys.executable, "-m", "bertfit.cli", "tune", train, "--validation", dev, "--trials", str(trials),
                 "--storage", storage, "--study", "shared", "--out", str(tmp_path / name), "--config", space,
                 "--model", tiny_model, "--max-length", "32", "--no-export"] for name, trials in (("a", 2), ("b", 1))]
    envs = [dict(os.environ, CUDA_VISIBLE_DEVICES="")] * 2
    for code, log in run_together(commands, envs, [tmp_path / "a.log", tmp_path / "b.log"], timeout=600):
        assert code == 0, log[-3000:]

    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2]  # distinct numbers; 2 + 1 trials in all
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2
    # Each process ends with the study's best so far in its own folder.
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "run.json").read_text())["state"] == "complete"
    assert len(_trials(tmp_path / "b")) >= 1


@pytest.mark.slow
def test_a_failed_trial_does_not_end_the_study(tiny_model, files, tmp_path, monkeypatch):
    from bertfit import training
    from bertfit.errors import BertfitError
    from bertfit.tuning import tune

    train, dev, space = files
    real, calls = training.fine_tune, []

    def first_diverges(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise BertfitError("the training loss became nan at epoch 1, batch 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "fine_tune", first_diverges)
    tune(train, dev, trials=2, out=tmp_path / "out", config_file=space, model=tiny_model, log=lambda m: None, **FAST)
    trials = _trials(tmp_path / "out")
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE"] and "nan" in trials[0]["error"]
    assert len(calls) == 3  # two trials, then the final run


@pytest.mark.parametrize("args, message", [
    (["--storage", "not a url"], "cannot open the Optuna storage"),
    (["--storage", "sqlite:////nonexistent-folder/x/study.db"], "cannot open the Optuna storage"),
    (["--storage", "postgresql://user:s3cret@127.0.0.1:1/db"], "cannot open the Optuna storage"),
    (["--metric", "f2_score"], "unknown metric 'f2_score'"),
    (["--config", "{empty}"], "search_space is empty"),
    (["--config", "{invalid}"], "search_space.learning_rate: type must be float, int or categorical"),
    (["--config", "{bounds}"], "search_space.dropout: the value 1.5 is not a valid dropout"),
    (["--config", "{unknown}"], "search_space.colour: not a tunable option"),
    (["--strategy", "multi-worker"], "start `bertfit tune` on each machine"),
    (["--config", "{start}"], "start_points[0].learning_rate: 5.0 is outside [1e-05, 0.0003]"),
    (["--config", "{start_key}"], "start_points[0].colour: not in the search space"),
])
def test_bad_input_exits_2(tiny_model, files, tmp_path, capsys, args, message):
    train, dev, _ = files
    configs = {"{empty}": "search_space: {}\n",
               "{invalid}": "search_space:\n  learning_rate: {type: gaussian, low: 0, high: 1}\n",
               "{bounds}": "search_space:\n  dropout: {type: float, low: 0.0, high: 1.5}\n",
               "{unknown}": "search_space:\n  colour: {type: categorical, choices: [red]}\n",
               "{start}": "start_points:\n  - {learning_rate: 5.0}\n",
               "{start_key}": "start_points:\n  - {colour: red}\n"}
    args = list(args)
    for i, a in enumerate(args):
        if a in configs:
            (tmp_path / "c.yaml").write_text(configs[a])
            args[i] = str(tmp_path / "c.yaml")
    code = main(["tune", train, "--validation", dev, "--out", str(tmp_path / "out"), "--model", tiny_model,
                 "--trials", "1", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "bertfit: error:" in err and message in err, err
    assert "s3cret" not in err
    assert not (tmp_path / "out" / "run.json").exists()


def test_start_points_are_tried_first(tiny_model, files, tmp_path):
    from bertfit.tuning import tune

    train, dev, space = files
    points = [{"learning_rate": 4e-3, "batch_size": 16}, {"learning_rate": 2e-2, "batch_size": 32}]
    tune(train, dev, trials=2, out=tmp_path / "out", config_file=space, start_points=points, model=tiny_model,
         log=lambda m: None, **FAST)
    assert [t["params"] for t in _trials(tmp_path / "out")] == points
    # Resumed with one more point: only the new one is enqueued, and it runs next.
    more = points + [{"learning_rate": 1e-2, "batch_size": 16}]
    tune(train, dev, trials=1, out=tmp_path / "out", config_file=space, start_points=more, model=tiny_model,
         log=lambda m: None, **FAST)
    assert [t["params"] for t in _trials(tmp_path / "out")] == more


def test_out_must_not_hold_something_else(tiny_model, files, tmp_path, capsys):
    train, dev, _ = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["tune", train, "--validation", dev, "--out", str(out), "--model", tiny_model]) == 2
    assert "neither a bertfit tuning nor a run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_search_space_and_importance_helpers():
    import optuna

    from bertfit.errors import ConfigError
    from bertfit.tuning import DEFAULT_SEARCH_SPACE, importances, metric_value, parse_search_space

    metrics = {"accuracy": 0.8, "log_loss": 0.4, "per_class": {"0": {"f1": 0.7}, "1": {"f1": 0.9}}, "roc_auc": None}
    assert metric_value(metrics, "f1_positive", ["0", "1"]) == 0.9  # the second label in sorted order
    assert metric_value(metrics, "loss", ["0", "1"]) == 0.4 and metric_value(metrics, "accuracy", ["0", "1"]) == 0.8
    assert metric_value(metrics, "roc_auc", ["0", "1"]) != metric_value(metrics, "roc_auc", ["0", "1"])  # nan

    space = parse_search_space(DEFAULT_SEARCH_SPACE, {})
    assert space["learning_rate"] == {"type": "float", "low": 1e-5, "high": 3e-4, "log": True}
    assert space["batch_size"]["choices"] == [16, 32, 64] and space["epochs"]["type"] == "int"
    for bad in ({"epochs": {"type": "int", "low": 5, "high": 2}}, {"learning_rate": {"type": "float", "low": 0,
                                                                                      "high": 1, "log": True}},
                {"batch_size": {"type": "categorical", "choices": []}}, {"epochs": 3}, []):
        with pytest.raises(ConfigError):
            parse_search_space(bad, {})

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=2)
    method, imp = importances(study.trials, ["x", "y"])
    assert imp == {} and "too few" in method
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=4)
    method, imp = importances(study.trials, ["x", "y"])
    assert "Spearman" in method and imp["x"] == pytest.approx(1.0)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=6)
    method, imp = importances(study.trials, ["x", "y"])
    assert method.startswith("optuna.importance") and max(imp, key=imp.get) == "x"


def test_default_pruner_judges_trials_from_their_second_epoch():
    import optuna

    from bertfit.tuning import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner(None, max_epochs=3))
    for _ in range(5):  # the startup trials: 0.9 at every epoch
        trial = study.ask()
        for epoch in (1, 2, 3):
            trial.report(0.9, epoch)
        study.tell(trial, 0.9)
    trial = study.ask()
    trial.report(0.1, 1)
    assert not trial.should_prune()  # far behind after epoch 1, but epoch 1 is not judged
    trial.report(0.1, 2)
    assert trial.should_prune()


def test_tune_takes_tf_data(tiny_model, tmp_path):
    """A tf.data.Dataset of (text, pair, label) is tuned over as a file is: a pair task."""
    import tensorflow as tf

    from bertfit.tuning import tune

    rows = sentiment_rows(96, seed=7)
    texts, labels = [t for t, _ in rows], [y for _, y in rows]
    data = tf.data.Dataset.from_tensor_slices((texts, ["the second one"] * 96, labels)).batch(16)
    space = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    clf = tune(data, trials=1, out=tmp_path / "out", search_space=space, model=tiny_model, epochs=1,
               batch_size=16, log=lambda m: None, **FAST)
    assert [t["state"] for t in _trials(tmp_path / "out")] == ["COMPLETE"]
    assert clf.data_config.pair_column == "pair" and clf.labels == ["neg", "pos"]
