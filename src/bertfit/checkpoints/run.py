"""bertfit run folders: `config.yaml`, `weights.safetensors`, `vocab.txt`.

config.yaml holds (besides whatever training records there) an `encoder:` mapping of
EncoderConfig fields, a top-level `lower_case:` bool and optionally `labels:` (names, in
output order). weights.safetensors holds the canonical dict (see bertfit.modeling), the
classifier head included as `classifier/kernel` [hidden, labels] and `classifier/bias`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import EncoderConfig, read_yaml_mapping
from ..errors import CheckpointError, ConfigError
from ..modeling import canonical_shapes
from ._common import HEAD, Checkpoint, atomic_path, finish, read_vocab, write_text, write_vocab

CONFIG, WEIGHTS, VOCAB = "config.yaml", "weights.safetensors", "vocab.txt"


def is_run(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def read_run(folder: Path) -> Checkpoint:
    from safetensors.numpy import load_file

    folder = Path(folder)
    data = read_yaml_mapping(folder / CONFIG, CheckpointError)
    if not isinstance(data.get("encoder"), dict):
        raise CheckpointError(f"{folder / CONFIG}: key 'encoder' (a mapping of encoder settings) is missing")
    try:
        config = EncoderConfig.from_dict(data["encoder"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG}: encoder: {e}") from None
    lower_case = data.get("lower_case")
    if not isinstance(lower_case, bool):
        raise CheckpointError(f"{folder / CONFIG}: key 'lower_case' (true or false) is missing")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, (str, int)) for x in labels)):
        raise CheckpointError(f"{folder / CONFIG}: 'labels' must be a list of names")
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{folder / WEIGHTS}: cannot read as safetensors ({e})") from None
    known = set(canonical_shapes(config)) | set(HEAD)
    meta = {"format": "bertfit-run", "source": str(folder), "ignored": sorted(set(weights) - known),
            "labels": [str(x) for x in labels] if labels is not None else None}
    ckpt = finish(config, weights, read_vocab(folder / VOCAB), lower_case, source=str(folder / WEIGHTS),
                  vocab_source=str(folder / VOCAB), meta=meta)
    if labels is not None and HEAD[0] in ckpt.weights and len(labels) != ckpt.weights[HEAD[0]].shape[1]:
        raise CheckpointError(f"{folder / CONFIG}: {len(labels)} labels but classifier/kernel has "
                              f"{ckpt.weights[HEAD[0]].shape[1]} outputs")
    return ckpt


def write_run_model(directory, config: EncoderConfig, weights: dict[str, np.ndarray], vocab: list[str],
                    lower_case: bool, labels: list[str] | None = None) -> Path:
    """Write the model part of a run folder, each file atomically (temp file, then os.replace).

    An existing config.yaml (training's resolved config) is kept and only its `encoder`,
    `lower_case` and `labels` keys are set, so this can run before or after training writes it.
    """
    import yaml
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(canonical_shapes(config)) + [k for k in HEAD if k in weights]
    missing = [k for k in canonical_shapes(config) if k not in weights]
    if missing:
        raise CheckpointError(f"cannot write {directory / WEIGHTS}: tensor {missing[0]!r} is missing")
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file({k: np.ascontiguousarray(weights[k], dtype="float32") for k in names}, tmp,
                  metadata={"format": "bertfit"})
    write_vocab(directory / VOCAB, vocab)
    data = read_yaml_mapping(directory / CONFIG, CheckpointError) if (directory / CONFIG).is_file() else {}
    data["encoder"] = config.to_dict()
    data["lower_case"] = bool(lower_case)
    if labels is not None:
        data["labels"] = [str(x) for x in labels]
    write_text(directory / CONFIG, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return directory
