"""Configuration dataclasses: the one source of defaults, saved with each run."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass
class EncoderConfig:
    """Shape and regularization of a BERT encoder (names follow the BERT paper's config)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"  # exact (erf) GELU, as in BERT
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (gelu, gelu_new, relu)")

    @classmethod
    def from_bert_json(cls, d: dict[str, Any]) -> "EncoderConfig":
        """From a Hugging Face `config.json` or Google's `bert_config.json` (same key names)."""
        try:
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                intermediate_size=int(d["intermediate_size"]),
                max_positions=int(d.get("max_position_embeddings", 512)),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                hidden_act=str(d.get("hidden_act", "gelu")),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
                hidden_dropout=float(d.get("hidden_dropout_prob", 0.1)),
                attention_dropout=float(d.get("attention_probs_dropout_prob", 0.1)),
            )
        except KeyError as e:
            raise ConfigError(f"BERT config is missing the key {e.args[0]!r}") from None

    def to_bert_json(self) -> dict[str, Any]:
        """The Hugging Face / Google key names, for writing checkpoints."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_positions,
            "type_vocab_size": self.type_vocab_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "initializer_range": 0.02,
            "model_type": "bert",
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        return _from_dict(cls, d, "encoder")


def _from_dict(cls, d: dict[str, Any], section: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {section} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    check_types(cls, d)
    return cls(**d)


# What each annotation in these dataclasses admits (NumPy's numbers too: numbers.Integral and Real).
_KINDS = {"int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
          "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
          "str": ("a string", lambda v: isinstance(v, str)),
          "bool": ("true or false", lambda v: isinstance(v, bool)),
          "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
          "None": ("nothing (null)", lambda v: v is None)}


COMMAND_LINE = False  # set by the command line: messages then name its flags, not Python's keywords


def option(name: str, value: Any = None) -> str:
    """An option as the user spells it, for messages: `--learning-rate 3e-05`, `--no-header` on the
    command line; `learning_rate=3e-05`, `header=False` for the Python API."""
    if not COMMAND_LINE:
        return f"{name}=" + ("" if value is None else repr(value))
    flag = "--" + name.replace("_", "-")
    if value is True or value is False:
        return flag if value else "--no-" + flag[2:]
    return flag if value is None else f"{flag} {value}"


def options_in_signature(function):
    """A function's **options as real keyword parameters for help(), IDEs and inspect.signature: every
    DataConfig and TrainConfig field with its default (an option not given is left to the config file,
    then to that default)."""
    import inspect

    signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    named = {p.name for p in params}
    for cls in (DataConfig, TrainConfig):
        for f in fields(cls):
            if f.name not in named:
                default = None if f.default is dataclasses.MISSING else f.default
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=f.type))
    function.__signature__ = signature.replace(parameters=params)
    return function


def check_types(cls, options: dict[str, Any], where: str = ""):
    """A clear error for an option of the wrong type (`epochs: three` in a YAML file), naming it and
    what it takes, before the value reaches code that would fail on it with a traceback."""
    annotations = {f.name: f.type for f in fields(cls)}
    for name, value in options.items():
        if name not in annotations:
            continue
        kinds = [_KINDS[part.strip()] for part in str(annotations[name]).split("|")]
        if not any(ok(value) for _, ok in kinds):
            wanted = " or ".join(description for description, _ in kinds)
            raise ConfigError(f"{where}{name} must be {wanted}, got {value!r}")


@dataclass
class DataConfig:
    """How to read a data file; saved with the run so that evaluate/predict read new files alike."""

    text_column: str | int | None = None
    pair_column: str | int | None = None
    label_column: str | int | None = None
    label_columns: list[str] | None = None  # multi-label from several 0/1 columns
    label_delimiter: str | None = None       # multi-label from one delimited column
    label_names: str | None = None           # file with one label name per line (ids -> names)
    format: str | None = None
    header: bool | None = None               # None: detect
    quoting: str | None = None               # "csv" for CSV-quoted TSV
    encoding: str = "utf-8"

    @property
    def multilabel(self) -> bool:
        return bool(self.label_columns) or self.label_delimiter is not None

    def read_options(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        return _from_dict(cls, d, "data")


METRICS = ("accuracy", "f1_positive", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro", "mcc",
           "roc_auc", "pr_auc", "loss")


@dataclass
class TrainConfig:
    """The fine-tuning recipe. Defaults are BERT's (Devlin et al.) as Hugging Face's Trainer applies it."""

    model: str = "minilm-l6"
    lower_case: bool | None = None           # None: what the checkpoint says
    max_length: int = 128
    truncation: str = "longest_first"        # longest_first|only_second|head|tail|head+tail
    head_tokens: int | None = None           # head+tail: tokens kept from the start
    long_text: str = "truncate"              # truncate|window
    window_stride: int | None = None         # window: tokens between window starts (default: half)
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    adam_epsilon: float = 1e-8              # PyTorch's and HF Trainer's (Google's BERT: 1e-6)
    dropout: float = 0.1
    pooling: str = "cls"                     # cls (BERT's pooler on [CLS]) | mean (of the token vectors)
    gradient_accumulation: int = 1
    class_weight: str | None = None          # None|balanced
    layerwise_lr_decay: float = 1.0          # 1.0 = off; e.g. 0.9 scales each lower layer's lr by 0.9
    metric: str = "auto"                     # validation metric for the best checkpoint and early stopping
    early_stopping: int | None = None        # patience in epochs without improvement
    validation_split: float = 0.1            # used when no validation file is given
    seed: int = 0
    checkpoint_every: int = 500              # steps between resumable checkpoints (and each epoch end)
    strategy: str = "auto"                   # auto|one-device|mirrored|multi-worker|tpu
    mixed_precision: str | None = None       # None|bf16|fp16
    jit: bool = False                        # XLA-compile the training step
    export: bool = True                      # write saved_model/ after training
    keep_checkpoints: bool = False           # keep checkpoints/ once the run is complete

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.adam_epsilon > 0, "adam_epsilon must be positive"),  # 0: 0/0 where a gradient is 0
            (self.weight_decay >= 0, "weight_decay must be 0 or more"),
            (self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm must be 0 (off) or more"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.gradient_accumulation >= 1, "gradient_accumulation must be at least 1"),
            (0 < self.layerwise_lr_decay <= 1, "layerwise_lr_decay must be in (0, 1]"),
            (0 < self.validation_split < 1, "validation_split must be in (0, 1)"),
            (self.max_length is None or 3 <= self.max_length <= 4096, "max_length must be between 3 and 4096"),
            (self.class_weight in (None, "balanced"), "class_weight must be 'balanced' or unset"),
            (self.metric == "auto" or self.metric in METRICS, f"metric must be 'auto' or one of {', '.join(METRICS)}"),
            (self.mixed_precision in (None, "bf16", "fp16"), "mixed_precision must be bf16, fp16 or unset"),
            (self.strategy in ("auto", "one-device", "mirrored", "multi-worker", "tpu"),
             "strategy must be auto, one-device, mirrored, multi-worker or tpu"),
            (self.long_text in ("truncate", "window"), "long_text must be truncate or window"),
            (self.pooling in ("cls", "mean"), "pooling must be cls or mean"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d, "train")


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flat options (CLI flags, YAML keys, fine_tune kwargs) into data and train dicts."""
    data_keys = {f.name for f in fields(DataConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - data_keys - train_keys)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, data_keys | train_keys, 1)) else u
                 for u in unknown]
        raise ConfigError(f"unknown option(s): {', '.join(hints)}")
    return ({k: v for k, v in options.items() if k in data_keys},
            {k: v for k, v in options.items() if k in train_keys})


def read_yaml_mapping(path, error=ConfigError, what="file") -> dict:
    """A YAML file whose top level is a mapping ({} when empty); a missing file, bad YAML or another top
    level raise `error` naming the file."""
    import yaml

    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except yaml.YAMLError as e:  # one line: where, and what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise error(f"{path}{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"{path}: expected a mapping of names to values at the top level, not a {type(loaded).__name__}")
    return loaded


def load_config_file(path) -> dict:
    """A YAML file of flat option names (or `data:`/`train:` sections of them)."""
    loaded = read_yaml_mapping(path, ConfigError, "config file")
    flat = {}
    for key, value in loaded.items():
        if key in ("data", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key.replace("-", "_")] = value
    for cls in (DataConfig, TrainConfig):
        check_types(cls, flat, where=f"{path}: ")
    return flat
