"""A timm model directory as downloaded from the Hugging Face Hub: its weights file and the preprocessing its
`config.json` records.

timm's ResNets keep torchvision's tensor names, so their weights convert as any checkpoint; what timm adds is
its evaluation transform, `timm.data.transforms_imagenet_eval` with the `pretrained_cfg` values
(`resolve_model_data_config`'s defaults, what a model card's example code runs): resize to
scale = floor(input_size / crop_pct), then center-crop input_size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..arch import Preprocessing
from ..errors import ModelFormatError

CONFIG = "config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the Hub's names, in timm's order of preference
# timm's defaults for a pretrained_cfg key that is absent (timm.data.config.resolve_data_config).
_DEFAULTS = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
             "mean": list(Preprocessing.mean), "std": list(Preprocessing.std)}


@dataclass(frozen=True)
class TimmModel:
    weights: Path  # model.safetensors or pytorch_model.bin
    preprocessing: Preprocessing
    tag: str | None  # pretrained_cfg's tag, e.g. "a1_in1k": the weights' name
    labels: tuple[str, ...] | None  # config.json's label_names, where it has them


def read_dir(path: Path) -> TimmModel:
    """The weights file and preprocessing of a timm Hub directory, or ModelFormatError naming what is wrong."""
    config_path = path / CONFIG
    if not config_path.is_file():
        raise ModelFormatError(f"{path} is a directory without {CONFIG}: give a checkpoint file, or a timm model "
                               f"directory ({CONFIG} and {' or '.join(WEIGHTS)})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelFormatError(f"{config_path}: cannot read timm's config: {e}") from e
    cfg = config.get("pretrained_cfg") if isinstance(config, dict) else None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{config_path}: no 'pretrained_cfg' object: is this a timm model directory?")
    weights = next((path / name for name in WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ModelFormatError(f"{path}: a timm directory needs its weights, {' or '.join(WEIGHTS)}; neither is there")
    try:
        preprocessing = eval_preprocessing(cfg)
    except ModelFormatError as e:
        raise ModelFormatError(f"{config_path}: {e}") from None
    labels = config.get("label_names")
    labels = tuple(labels) if isinstance(labels, list) and all(isinstance(s, str) for s in labels) else None
    tag = cfg.get("tag") if isinstance(cfg.get("tag"), str) and cfg.get("tag") else None
    return TimmModel(weights, preprocessing, tag, labels)


def eval_preprocessing(cfg: dict) -> Preprocessing:
    """timm's eval transform for a pretrained_cfg as a `Preprocessing`: crop_mode "center" resizes the shorter
    side to floor(size / crop_pct), "squash" resizes to exactly that, and both center-crop input_size;
    "border" (resize the longer side, then pad with the mean) has no torchvision equivalent and is refused."""
    value = {k: cfg.get(k) if cfg.get(k) is not None else d for k, d in _DEFAULTS.items()}
    size = value["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ModelFormatError(f"pretrained_cfg input_size must be [3, height, width], got {size!r}")
    crop_pct = value["crop_pct"]
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 4:
        raise ModelFormatError(f"pretrained_cfg crop_pct must be a number in (0, 4], got {crop_pct!r}")
    height, width = size[1:]
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    mode = value["crop_mode"]
    if mode == "squash":
        resize = scale
    elif mode == "center" and scale[0] == scale[1]:
        resize = scale[0]
    else:
        raise ModelFormatError(f"pretrained_cfg crop_mode {mode!r} with input_size {size} has no torchvision "
                               "transform we can record; known: 'center' (square sizes) and 'squash'")
    p = Preprocessing(resize=resize, crop=height if height == width else (height, width), mean=value["mean"],
                      std=value["std"], interpolation=value["interpolation"])
    problem = p.problem()
    if problem:
        raise ModelFormatError(f"pretrained_cfg: {problem}")
    return p
