"""The command line: every bad-input case exits 2 with one clear line, and leaves no run that looks complete."""

import json
import os
import re
import stat

import numpy as np
import pytest

import bertfit
from bertfit.cli import main
from conftest import EDGE_TEXTS, random_run, sentiment_rows, write_tsv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "empty.tsv").write_text("")
    write_tsv(d / "ws.tsv", ["sentence", "label"], [("hello", "1"), ("   ", "0"), ("x", "1")])
    write_tsv(d / "nan.tsv", ["sentence", "label"], [("hello", "1"), ("world", "NaN")])
    write_tsv(d / "one.tsv", ["sentence", "label"], [("hello", "1"), ("world", "1")])
    (d / "malformed.tsv").write_text("sentence\tlabel\nhello\t1\nworld\t0\textra\n")
    (d / "bytes.tsv").write_bytes(b"sentence\tlabel\nhello\t1\nw\xff\xferld\t0\n")
    write_tsv(d / "ok.tsv", ["sentence", "label"], [(t, lab) for t, lab in sentiment_rows(40)])
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CASES = [
    ("ok.tsv", ["--text-column", "sentense"], r"no column 'sentense'.*Did you mean 'sentence'"),
    ("empty.tsv", [], r"empty.tsv: the file is empty"),
    ("ws.tsv", [], r"ws.tsv, line 3: empty or missing text"),
    ("nan.tsv", [], r"nan.tsv, line 3: missing label"),
    ("one.tsv", [], r"only the class '1'"),
    ("malformed.tsv", [], r"malformed.tsv, line 3: 3 tab-separated fields"),
    ("bytes.tsv", [], r"bytes.tsv, line 3: .*not valid utf-8; pass --encoding"),
    ("missing.tsv", [], r"missing.tsv"),
    ("ok.tsv", ["--long-text", "window", "--pair-column", "label"], r"window.*single texts"),
    ("ok.tsv", ["--learning-rate", "-1"], r"learning_rate must be positive"),
    ("ok.tsv", ["--adam-epsilon", "0"], r"adam_epsilon must be positive"),
    ("ok.tsv", ["--truncation", "middle"], r"truncation"),
    ("ok.tsv", ["--pooling", "max"], r"pooling must be cls or mean"),
    ("ok.tsv", ["--max-length", "1024"], r"max_length 1024 exceeds the model's 128 positions"),
]


@pytest.mark.parametrize("name,flags,message", CASES, ids=[f"{c[0]}{''.join(c[1][:1])}" for c in CASES])
def test_bad_input_exits_2_with_a_clear_line(capsys, tmp_path, files, tiny_model, name, flags, message):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", files / name, "--model", tiny_model, "--out", out, "--epochs", "1",
                       "--no-export", *flags)
    assert code == 2, err
    assert "Traceback" not in err
    import re

    assert re.search(message, err.strip().splitlines()[-1]), err
    assert not (out / "metrics.json").exists()
    assert not (out / "run.json").exists() or json.loads((out / "run.json").read_text())["state"] != "complete"


def test_existing_folder_is_never_overwritten_silently(capsys, tmp_path, files, tiny_model):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", out)
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", out, "--overwrite")
    assert code == 2 and "does not look like a bertfit run folder" in err
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(capsys, tmp_path, files, tiny_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", locked / "run")
    assert code == 2 and "cannot write" in err


def test_unwritable_output_path(capsys, tmp_path, files, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", blocker / "run")
    assert code == 2 and "cannot write to the output folder" in err


def test_python_api_names_keywords_where_the_cli_names_flags(capsys, tmp_path, files, tiny_model):
    """The same mistake, both ways: `text_column=` from Python, `--text-column` from the command line;
    and bertfit.fine_tune's signature lists every option with its default (issue 27, item 2)."""
    import inspect

    from bertfit import training
    from bertfit.errors import DataError

    with pytest.raises(DataError, match=r"no column 'nope' \(text_column=\)") as info:
        bertfit.fine_tune(files / "ok.tsv", text="nope", model=tiny_model)
    assert "--" not in str(info.value)
    code, _, err = run(capsys, "train", files / "ok.tsv", "--text-column", "nope", "--model", tiny_model,
                       "--out", tmp_path / "r")
    assert code == 2 and "no column 'nope' (--text-column)" in err
    with pytest.raises(DataError, match=r"format='xls'|unknown format 'xls': format= must be"):
        bertfit.fine_tune(files / "ok.tsv", format="xls", model=tiny_model)

    signature = inspect.signature(bertfit.fine_tune)
    for name, default in (("learning_rate", 5e-5), ("epochs", 3), ("max_length", 128), ("text_column", None),
                          ("out", None), ("resume", False), ("label_delimiter", None), ("encoding", "utf-8")):
        assert signature.parameters[name].default == default, name
    assert signature.parameters == inspect.signature(training.fine_tune).parameters  # the wrapper and the code
    assert "resume=True" in bertfit.fine_tune.__doc__ and "learning_rate" in bertfit.fine_tune.__doc__


def test_resume_without_a_run(capsys, tmp_path, files, tiny_model):
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", tmp_path / "none", "--resume")
    assert code == 2 and "nothing to resume" in err


def test_unknown_config_key(capsys, tmp_path, files, tiny_model):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.001\n")
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", tmp_path / "r", "--config", cfg)
    assert code == 2 and "did you mean learning_rate" in err


def test_xla_inference_equals_the_plain_forward_pass(capsys, tmp_path, tiny_model):
    """--jit pads batches to a few shapes for XLA; the answers stay those of the plain pass."""
    import numpy as np

    run_dir = random_run(tiny_model, tmp_path)
    clf = bertfit.load(run_dir)
    texts = EDGE_TEXTS + [" ".join(["good"] * n) for n in (3, 9, 17, 25, 40)]
    features = clf.encode(texts)
    plain = clf.predict_features(features, batch_size=3)
    jitted = clf.predict_features(features, batch_size=3, jit=True)  # several lengths, a partial last batch
    assert np.ptp(plain[:, 0]) > 1e-3  # the answers differ from text to text: the comparison means something
    np.testing.assert_allclose(jitted, plain, atol=1e-5)
    compiled = clf.forward_fn(jit=True).experimental_get_tracing_count()
    assert compiled == 1  # one trace; XLA compiles each padded shape under it

    code, stdout, err = run(capsys, "predict", run_dir, *texts[-3:], "--jit")
    assert code == 0, err
    got = [json.loads(line)["probabilities"] for line in stdout.splitlines()]
    np.testing.assert_allclose([list(p.values()) for p in got], plain[-3:], atol=1e-5)


def test_jit_keeps_compiled_programs_between_processes(tmp_path, tiny_model):
    """`predict --jit` in a fresh process stores XLA's programs in $BERTFIT_XLA_CACHE; the next process reuses them."""
    import subprocess
    import sys

    run_dir = random_run(tiny_model, tmp_path)
    cache = tmp_path / "xla-cache"
    env = {**os.environ, "BERTFIT_XLA_CACHE": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_XLA_FLAGS", None)
    command = [sys.executable, "-m", "bertfit.cli", "predict", str(run_dir), "a great film", "--jit"]
    answers = []
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        answers.append(json.loads(done.stdout.splitlines()[-1]))
        if len(answers) == 1:
            kept = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
            assert kept and all(name.startswith("xla_compile_cache") for name in kept)
    # The second process loaded them: a compile would have written (replaced) a file.
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == kept
    assert answers[0] == answers[1]
    assert answers[0]["label"] == bertfit.load(run_dir).predict(["a great film"])[0]["label"]


def test_train_predict_evaluate_inspect(capsys, tmp_path, files, tiny_model):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", out, "--epochs", "1",
                            "--no-export", "--validation-split", "0.25")
    assert code == 0, err
    assert "report:" in stdout
    code, stdout, _ = run(capsys, "predict", out, "a great film", "an awful plot")
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a great film", "an awful plot"]
    assert set(rows[0]["probabilities"]) == {"neg", "pos"}

    code, stdout, _ = run(capsys, "evaluate", out, files / "ok.tsv", "--json", "--errors", "3")
    metrics = json.loads(stdout)
    assert code == 0 and metrics["num_examples"] == 40 and len(metrics["errors"]) <= 3
    ok_lines = (files / "ok.tsv").read_text().split("\n")
    for e in metrics["errors"]:  # each names its line, as predict's answers and data errors do
        assert e["line"] == e["index"] + 2 and ok_lines[e["line"] - 1].startswith(e["text"] + "\t")

    pred = tmp_path / "pred.jsonl"
    code, _, err = run(capsys, "predict", out, "--input", files / "ok.tsv", "--output", pred)
    assert code == 0, err
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(2, 42))  # each answer names its input line (1: header)
    # A folder (IMDB's layout) through a model trained on a TSV: the run's columns do not apply to it,
    # and each answer names its file.
    folder = tmp_path / "reviews"
    for label, name, text in (("pos", "1.txt", "a great film"), ("neg", "2.txt", "an awful plot")):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / name).write_text(text)
    code, _, err = run(capsys, "predict", out, "--input", folder, "--output", pred)
    assert code == 0, err
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(folder / "neg" / "2.txt"), str(folder / "pos" / "1.txt")]
    assert [r["label"] for r in rows] == [p["label"] for p in bertfit.load(out).predict(["an awful plot", "a great film"])]
    code, stdout, err = run(capsys, "evaluate", out, folder, "--json")  # labels from the subfolders
    assert code == 0, err
    assert json.loads(stdout)["num_examples"] == 2 and set(json.loads(stdout)["per_class"]) == {"neg", "pos"}

    code, stdout, _ = run(capsys, "inspect", files / "ok.tsv", "--model", tiny_model, "--json", "--max-length", "8")
    report = json.loads(stdout)
    assert code == 0 and report["rows"] == 40 and report["labels"] == {"pos": 20, "neg": 20}
    assert report["truncated_share"] == 1.0  # every text has 7 words + [CLS]/[SEP] > 8

    code, stdout, _ = run(capsys, "export", out, "--format", "hf")
    assert code == 0 and stdout.strip() == f"wrote {out / 'hf'}" and (out / "hf" / "model.safetensors").exists()
    code, _, err = run(capsys, "export", out, "--format", "hf")  # never over what is there
    assert code == 2 and "already exists" in err


def test_help_says_each_default_once_and_helps_every_option():
    """Every option of every verb has help; a default is said once, never as "(default: None)"
    (issue 26 item 4, issue 27 item 2)."""
    import re

    from bertfit.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    assert {"train", "tune", "predict", "serve", "export", "inspect", "evaluate", "demo"} <= set(verbs)
    for verb, sub in verbs.items():
        text = sub.format_help()
        assert "(default: None)" not in text, verb
        for action in sub._actions:
            if action.help == "==SUPPRESS==" or "-h" in action.option_strings:
                continue
            assert action.help, (verb, action.dest)
            shown = sub._get_formatter()._expand_help(action)
            assert len(re.findall(r"default", shown)) <= 1 or action.dest in ("quoting", "model"), (verb, shown)
    train, serve = (" ".join(verbs[v].format_help().split()) for v in ("train", "serve"))  # unwrapped
    assert "(default: 5e-05)" in train and "(default: 32)" in train  # TrainConfig's values, once
    assert "(default: 127.0.0.1)" in serve and "(default: 8501)" in serve


def test_unknown_flags_get_the_verbs_usage_and_a_suggestion(capsys):
    """Hugging Face's spellings and near misses are named with the flag meant; abbreviations are not
    silently taken; --version answers (issue 27, item 2). All before TensorFlow would load."""
    for argv, expected in ((["--learning_rate", "3e-5"], "--learning_rate: did you mean --learning-rate?"),
                           (["--output_dir", "o"], "--output_dir: did you mean --out?"),
                           (["--num_train_epochs", "2"], "--num_train_epochs: did you mean --epochs?"),
                           (["--max_seq_length", "64"], "--max_seq_length: did you mean --max-length?"),
                           (["--learn", "1e-5"], "unrecognized arguments: --learn 1e-5"),  # once an abbreviation
                           (["--bach-size", "8"], "--bach-size: did you mean --batch-size?")):
        with pytest.raises(SystemExit) as info:
            main(["train", "data.tsv", "--out", "runs/x", *argv])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "usage: bertfit train" in err and expected in err, err
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"bertfit {bertfit.__version__}"


def test_wrong_types_in_a_config_file_and_a_file_as_out_exit_2(capsys, tmp_path, files, tiny_model):
    """One line naming the file and the option, not a TypeError's traceback (issue 26, item 1)."""
    for text, message in (("epochs: three\n", "epochs must be an integer, got 'three'"),
                          ("max_length: [64]\n", "max_length must be an integer, got [64]"),
                          ("train:\n  learning_rate: fast\n", "learning_rate must be a number, got 'fast'"),
                          ("label_columns: joy\n", "label_columns must be a list of strings or nothing (null)"),
                          ("epochs: [3\n", "not valid YAML (expected ',' or ']', but got '<stream end>')"),
                          ("- epochs: 3\n", "expected a mapping of names to values at the top level, not a list")):
        config = tmp_path / "config.yaml"
        config.write_text(text)
        code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", tmp_path / "run",
                           "--config", config)
        assert code == 2 and "Traceback" not in err, err
        assert f"{config}" in err and message in err and len(err.strip().splitlines()) == 1, err
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", taken)
    assert code == 2 and "Traceback" not in err and f"{taken} is a file, not a folder" in err, err
    assert taken.read_text() == "mine"


def test_tensorflow_start_up_lines_are_not_shown(tmp_path):
    """A CPU machine's TensorFlow start-up lines (absl's INFO lines, oneDNN, no CUDA driver, cuInit) are
    kept off the terminal: an error is the one line the user sees (issue 27, item 5)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "bertfit.cli", "predict", str(tmp_path / "nothing"), "a text"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr == f"bertfit: error: {tmp_path / 'nothing'}: no such run folder\n", done.stderr


def test_bad_columns_fail_before_tensorflow_loads(tmp_path, files):
    """A wrong column (or format, or encoding) in the training or validation file is found on its first
    row, before TensorFlow is imported (7-13 s before; issue 27, item 5); no run folder is made."""
    import subprocess
    import sys

    for extra in (["--text-column", "sentense"], ["--validation", str(files / "empty.tsv")]):
        code = ("import sys; from bertfit.cli import main; "
                f"code = main({['train', str(files / 'ok.tsv'), '--out', str(tmp_path / 'r'), *extra]!r}); "
                "print(code, 'tensorflow' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
        assert done.stderr.startswith("bertfit: error: ") and not (tmp_path / "r").exists()
    assert "Did you mean 'sentence'" in subprocess.run(
        [sys.executable, "-m", "bertfit.cli", "train", str(files / "ok.tsv"), "--text-column", "sentense",
         "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300).stderr


def test_evaluate_predict_serve_export_tune_check_the_run_and_the_data_before_tensorflow_loads(tmp_path, files,
                                                                                               tiny_model):
    """Issue 27 item 5: a wrong column, file, kept column or run folder for evaluate, predict --input,
    serve, export and tune fails on the first row, before TensorFlow is imported; a right one goes on."""
    import subprocess
    import sys

    run_dir = str(random_run(tiny_model, tmp_path, saved_model=False))  # its text column: 'a'
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\na film\tpos\n")
    for argv, message in (
        (["evaluate", run_dir, str(bad)], "no column 'a'"),
        (["evaluate", run_dir, str(files / "ok.tsv"), "--text-column", "sentense"], "Did you mean 'sentence'"),
        (["evaluate", run_dir, str(tmp_path / "missing.tsv")], "missing.tsv: no such file"),
        (["predict", run_dir, "--input", str(bad)], "no column 'a'"),
        (["predict", run_dir, "--input", str(bad), "--text-column", "text", "--keep-columns", "id"], "no column 'id'"),
        (["predict", str(tmp_path), "--input", str(files / "ok.tsv")], "not a bertfit run folder"),
        (["serve", str(tmp_path / "nothing")], "nothing: no such run folder"),
        (["export", str(files / "ok.tsv")], "ok.tsv: a file, not a run folder"),
        (["tune", str(files / "ok.tsv"), "--out", str(tmp_path / "t"), "--text-column", "sentense"], "Did you mean"),
        (["predict", run_dir, "--input", str(bad), "--text-column", "text", "--output", str(tmp_path / "no" / "o.csv")],
         "cannot write --output"),
        (["evaluate", run_dir, str(files / "ok.tsv"), "--text-column", "sentence", "--json"], None),
    ):
        code = (f"import sys; from bertfit.cli import main; code = main({argv!r}); "
                "print(code, 'tensorflow' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        if message is None:
            assert done.stdout.split()[-2:] == ["0", "True"], (done.stdout, done.stderr)
        else:
            assert done.stdout.split() == ["2", "False"], (argv, done.stdout, done.stderr)
            assert done.stderr.startswith("bertfit: error: ") and message in done.stderr, done.stderr


def test_predict_in_a_pipeline(capsys, tmp_path, files, tiny_model, monkeypatch):
    """No --output: answers on stdout; --input - reads stdin (its format sniffed, or --format); a .csv
    output (or --output-format csv) is CSV with a probability column per label (issue 27, item 3)."""
    import csv
    import io
    import sys

    run_dir = random_run(tiny_model, tmp_path, saved_model=False)
    clf = bertfit.load(run_dir)
    col = ["--text-column", "sentence"]
    rows = [line.split("\t") for line in (files / "ok.tsv").read_text().splitlines()[1:]]
    want = clf.predict_proba([r[0] for r in rows])

    code, stdout, err = run(capsys, "predict", run_dir, "--input", files / "ok.tsv", *col)
    assert code == 0 and "wrote 40 predictions to stdout" in err, err
    answers = [json.loads(line) for line in stdout.splitlines()]
    assert [a["line"] for a in answers] == list(range(2, 42))
    np.testing.assert_allclose([list(a["probabilities"].values()) for a in answers], want, atol=1e-5)

    for data, extra in ((files / "ok.tsv").read_bytes(), []),  \
            ("".join(json.dumps({"sentence": r[0]}) + "\n" for r in rows).encode(), []), \
            ((files / "ok.tsv").read_bytes(), ["--format", "tsv"]):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        code, stdout, err = run(capsys, "predict", run_dir, "--input", "-", *col, *extra)
        assert code == 0, err
        got = [json.loads(line) for line in stdout.splitlines()]
        np.testing.assert_allclose([list(a["probabilities"].values()) for a in got], want, atol=1e-5)
        assert got[0]["line"] == (2 if data.startswith(b"sentence") else 1)

    # A named pipe (bash's <(zcat new.tsv.gz)) is read once, like stdin; train refuses one at once.
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_bytes((files / "ok.tsv").read_bytes()))
    writer.start()
    code, stdout, err = run(capsys, "predict", run_dir, "--input", pipe, *col)
    writer.join()
    assert code == 0, err
    np.testing.assert_allclose([list(json.loads(a)["probabilities"].values()) for a in stdout.splitlines()], want,
                               atol=1e-5)
    code, _, err = run(capsys, "train", pipe, "--out", tmp_path / "r")
    assert code == 2 and "is a pipe" in err and not (tmp_path / "r").exists(), err
    # evaluate reads its data once too: the same metrics from a pipe as from the file.
    code, from_file, err = run(capsys, "evaluate", run_dir, files / "ok.tsv", *col, "--json", "--label-column", "label")
    assert code == 0, err
    writer = threading.Thread(target=lambda: pipe.write_bytes((files / "ok.tsv").read_bytes()))
    writer.start()
    code, from_pipe, err = run(capsys, "evaluate", run_dir, pipe, *col, "--json", "--label-column", "label")
    writer.join()
    assert code == 0 and json.loads(from_pipe) == json.loads(from_file), err

    out = tmp_path / "answers.csv"
    code, _, err = run(capsys, "predict", run_dir, "--input", files / "ok.tsv", *col, "--output", out)
    assert code == 0, err
    table = list(csv.reader(out.open()))
    assert table[0] == ["line", "label", *(f"p_{name}" for name in clf.labels)]
    assert [int(r[0]) for r in table[1:]] == list(range(2, 42))
    assert [r[1] for r in table[1:]] == [clf.labels[j] for j in want.argmax(1)]
    np.testing.assert_allclose([[float(x) for x in r[2:]] for r in table[1:]], want, atol=1e-5)
    code, stdout, _ = run(capsys, "predict", run_dir, "--input", files / "ok.tsv", *col, "--output-format", "csv")
    assert code == 0 and stdout.splitlines()[0] == ",".join(table[0]) and len(stdout.splitlines()) == 41
    code, _, err = run(capsys, "predict", run_dir, "a text", "--output", out)
    assert code == 2 and "--output is for --input FILE" in err


def test_predict_keeps_columns(capsys, tmp_path, tiny_model):
    """--keep-columns copies input columns (an id, a source) into every answer, typed as the input types
    them, for CSV, JSONL, Parquet and headerless files (issue 27, item 3)."""
    import csv

    import pandas as pd

    run_dir = random_run(tiny_model, tmp_path, saved_model=False)
    clf = bertfit.load(run_dir)
    rows = [(f"r{i:03d}", text, "web" if i % 2 else "mail", label) for i, (text, label) in enumerate(sentiment_rows(9))]
    want = clf.predict_proba([r[1] for r in rows])
    data = tmp_path / "in.csv"
    data.write_text("id,sentence,source,label\n" + "".join(",".join(r) + "\n" for r in rows))

    code, stdout, err = run(capsys, "predict", run_dir, "--input", data, "--text-column", "sentence",
                            "--keep-columns", "id,source")
    assert code == 0, err
    answers = [json.loads(line) for line in stdout.splitlines()]
    assert [list(a) for a in answers[:1]] == [["line", "id", "source", "label", "probabilities"]]
    assert [(a["line"], a["id"], a["source"]) for a in answers] == [(i + 2, r[0], r[2]) for i, r in enumerate(rows)]
    np.testing.assert_allclose([list(a["probabilities"].values()) for a in answers], want, atol=1e-5)

    out = tmp_path / "answers.csv"
    code, _, err = run(capsys, "predict", run_dir, "--input", data, "--text-column", "sentence", "--keep-columns",
                       "id", "--output", out)
    assert code == 0, err
    table = list(csv.reader(out.open()))
    assert table[0] == ["line", "id", "label", *(f"p_{name}" for name in clf.labels)]
    assert [r[1] for r in table[1:]] == [r[0] for r in rows]

    # Typed formats keep their types: an int id and a list of tags from JSONL and Parquet.
    records = [{"id": i, "tags": ["a", "b"][: i % 3], "sentence": r[1]} for i, r in enumerate(rows)]
    jsonl, parquet = tmp_path / "in.jsonl", tmp_path / "in.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pd.DataFrame(records).to_parquet(parquet)
    for path, where in ((jsonl, "line"), (parquet, "row")):
        code, stdout, err = run(capsys, "predict", run_dir, "--input", path, "--text-column", "sentence",
                                "--keep-columns", "id,tags")
        assert code == 0, err
        answers = [json.loads(line) for line in stdout.splitlines()]
        assert [(a[where], a["id"], a["tags"]) for a in answers] == [(i + 1, r["id"], r["tags"]) for i, r in enumerate(records)]
    # Headerless: columns by index, named by their index.
    bare = tmp_path / "bare.tsv"
    bare.write_text("".join(f"{r[0]}\t{r[1]}\n" for r in rows))
    code, stdout, err = run(capsys, "predict", run_dir, "--input", bare, "--no-header", "--text-column", "1",
                            "--keep-columns", "0")
    assert code == 0, err
    assert [json.loads(line)["0"] for line in stdout.splitlines()] == [r[0] for r in rows]
    # From Python: the same, as a list.
    from bertfit.predict import predict_file

    assert predict_file(clf, data, tmp_path / "py.jsonl", text_column="sentence", keep_columns=["source"]) == 9
    assert [json.loads(line)["source"] for line in (tmp_path / "py.jsonl").read_text().splitlines()] == [r[2] for r in rows]

    for flags, message in ((["--keep-columns", "idd"], r"no column 'idd' \(--keep-columns\)\. Did you mean 'id'"),
                           (["--keep-columns", "id,label"], r"--keep-columns label: the output has its own 'label'")):
        code, stdout, err = run(capsys, "predict", run_dir, "--input", data, "--text-column", "sentence", *flags)
        assert code == 2 and re.search(message, err) and stdout == "", err
    code, _, err = run(capsys, "predict", run_dir, "a text", "--keep-columns", "id")
    assert code == 2 and "--keep-columns is for --input FILE" in err


def test_predict_output_that_cannot_be_written_exits_2(capsys, tmp_path, files, tiny_model):
    """--output in a folder that does not exist: one line, exit 2, nothing left behind (issue 26, item 1).
    (A read-only mount gives the same line; the tests run as root, which no permission stops.)"""
    run_dir = random_run(tiny_model, tmp_path, saved_model=False)
    target = tmp_path / "no-such-folder" / "out.jsonl"
    code, _, err = run(capsys, "predict", run_dir, "--input", files / "ok.tsv", "--text-column", "sentence",
                       "--output", target)
    assert code == 2 and "Traceback" not in err, err
    assert f"cannot write --output {target}: No such file or directory" in err.strip().splitlines()[-1]
    assert not target.parent.exists()


def test_a_train_that_fails_before_training_leaves_nothing_to_block_the_rerun(capsys, tmp_path, files, tiny_model):
    """Bad data (one class) or a bad model: no run folder, no token cache left; the corrected command
    runs; a folder the user made, empty, stays (issue 26, item 2)."""
    out = tmp_path / "run"
    for flags in (["--model", tiny_model], ["--model", tmp_path / "no-such-model"]):
        data = files / ("one.tsv" if flags[1] == tiny_model else "ok.tsv")
        code, _, err = run(capsys, "train", data, "--out", out, "--epochs", "1", "--no-export", *flags)
        assert code == 2 and "Traceback" not in err, err
        assert not out.exists(), list(out.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    code, _, err = run(capsys, "train", files / "one.tsv", "--model", tiny_model, "--out", mine, "--no-export")
    assert code == 2 and mine.is_dir() and not any(mine.iterdir())
    code, _, err = run(capsys, "train", files / "ok.tsv", "--model", tiny_model, "--out", out, "--epochs", "1",
                       "--no-export", "--max-length", "32")
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
