"""Fine-tuned models as their owners trained them (issue 24): a checkpoint converted with its own eval
transforms gives the logits of the owner's PyTorch pipeline, and a timm model directory from the Hugging Face
Hub converts with the transforms its config.json records, no options given.

The owner's pipeline is torchvision's transforms as tests/test_transforms.py reimplements them (Pillow's
resize as torchvision calls it, then torch), fed to tests/reference_resnet.py's model.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import pyggml_resnet
from pyggml_resnet import arch, loader
from pyggml_resnet.convert import main as convert_main
from pyggml_resnet.errors import ModelFormatError
from reference_resnet import make_model
from test_transforms import reference

HALF = (0.5, 0.5, 0.5)
BOUND = 1e-5  # relative L2 of f32 logits against PyTorch's (tests/test_model.py's)


def rel_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def photo(width=640, height=427, seed=0) -> Image.Image:
    """A photo-like RGB image, not square: smooth colour gradients, shapes with edges, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, np.cos(4 * y) * 0.4 + 0.5, x * y + 0.2], axis=-1) * 200
    im = Image.fromarray(np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse((width // 5, height // 4, width // 2, height * 3 // 4), fill=(220, 40, 30))
    draw.rectangle((width * 3 // 5, height // 6, width * 9 // 10, height // 2), fill=(20, 60, 200))
    return im


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A 10-class ResNet-18 as a fine-tuning script saves it: wrapped as `backbone.*`, beside a loss's
    weights, under Lightning's "state_dict"."""
    model = make_model(18, seed=24, num_classes=10)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(10)
    path = tmp_path_factory.mktemp("finetuned") / "classifier.ckpt"
    torch.save({"epoch": 9, "state_dict": state}, path)
    return model, path


def owners_logits(model, img: Image.Image, **transform) -> np.ndarray:
    x = reference(img, **transform)
    with torch.no_grad():
        return model(x[None]).numpy()


# The transforms fine-tuned classifiers are trained with, as convert options and as torchvision's arguments.
RECIPES = {
    "squash-0.5": (["--resize", "224,224", "--crop", "none", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5",
                    "0.5"], dict(resize=(224, 224), crop=None, mean=HALF, std=HALF)),
    "squash-then-crop-bicubic": (["--resize", "256,256", "--crop", "224", "--interpolation", "bicubic"],
                                 dict(resize=(256, 256), crop=224, interpolation="bicubic")),
    "no-resize": (["--resize", "none", "--crop", "400,600", "--interpolation", "lanczos"],
                  dict(resize=None, crop=(400, 600), interpolation="lanczos")),
    "tensor-resize": (["--resize", "160,200", "--crop", "none", "--no-antialias"],
                      dict(resize=(160, 200), crop=None, antialias=False)),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_finetuned_checkpoint_gives_the_owners_logits(finetuned, tmp_path, capsys, recipe):
    """Converted with its training transforms, the model's preprocess is the owner's pipeline (to the last bit
    on the PIL path) and its logits the owner's to f32 rounding; classify and the Ray path's Predictor agree."""
    from pyggml_resnet.ray import Predictor

    model, ckpt = finetuned
    options, transform = RECIPES[recipe]
    out = tmp_path / "classifier.gguf"
    assert convert_main([str(ckpt), str(out), *options]) == 0, capsys.readouterr().err
    img = photo()
    want_x = reference(img, **transform).numpy()
    want = owners_logits(model, img, **transform)
    with pyggml_resnet.load(out, threads=2) as m:
        assert m.preprocessing.input_size == want_x.shape[1:]
        x = m.preprocess(img)
        if transform.get("antialias", True):
            assert np.array_equal(x, want_x)
        else:  # torch's interpolate: to float32 rounding (tests/test_transforms.py)
            assert np.abs(x - want_x).max() <= 1e-5
        got = m.logits(x[None])
        assert rel_l2(got, want) <= BOUND, rel_l2(got, want)
        [top] = m.classify(img, top_k=1)
        assert top.index == int(np.argmax(want))
        assert m.classify([], top_k=1) == []  # an empty batch has the recorded input size
        path = tmp_path / "photo.png"
        img.save(path)
        row = Predictor.around(m, output="logits")({"path": np.array([str(path)], dtype=object)})
        assert np.array_equal(row["logits"], m.logits(m.preprocess(path)[None]))


def test_imagenet_defaults_are_not_the_owners_pipeline(finetuned, tmp_path):
    """Why it matters: converted without its transforms (resize 256, crop 224, ImageNet's mean and std), the
    same weights give other logits on the same photo than the owner's Resize((224, 224)) + 0.5/0.5."""
    model, ckpt = finetuned
    out = tmp_path / "defaults.gguf"
    assert convert_main([str(ckpt), str(out)]) == 0
    img = photo()
    want = owners_logits(model, img, resize=(224, 224), crop=None, mean=HALF, std=HALF)
    with pyggml_resnet.load(out, threads=2) as m:
        assert rel_l2(m.logits(m.preprocess(img)[None]), want) > 0.05


def test_python_convert_takes_the_preprocessing(finetuned, tmp_path):
    """`convert(preprocessing=...)`, documented in docs/usage.md: the same file as the options make."""
    model, ckpt = finetuned
    pre = arch.Preprocessing(resize=(224, 224), crop=None, mean=HALF, std=HALF)
    a = pyggml_resnet.convert.convert(ckpt, tmp_path / "a.gguf", preprocessing=pre, progress=False)
    assert convert_main([str(ckpt), str(tmp_path / "b.gguf"), *RECIPES["squash-0.5"][0]]) == 0
    assert a.read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert loader.read(a).preprocessing == arch.Preprocessing(resize=(224, 224), crop=None, mean=HALF, std=HALF)


def test_older_files_keep_their_meaning(finetuned, tmp_path):
    """A file of torchvision's classic transforms has only the keys it always had (no antialias key), so it
    reads the same in older versions and this one."""
    from gguf import GGUFReader

    _, ckpt = finetuned
    out = pyggml_resnet.convert.convert(ckpt, tmp_path / "m.gguf", progress=False)
    keys = {f.name for f in GGUFReader(out).fields.values()}
    assert arch.Key.ANTIALIAS not in keys and loader.read(out).preprocessing == arch.Preprocessing(
        mean=loader.read(out).preprocessing.mean, std=loader.read(out).preprocessing.std)
    assert loader.read(out).preprocessing.resize == 256 and loader.read(out).preprocessing.crop == 224


# --- timm model directories, as the Hugging Face Hub has them -----------------------------------------------


def timm_dir(tmp_path, model, pretrained_cfg, *, weights="model.safetensors", **config):
    """A timm Hub directory: config.json with its pretrained_cfg, and the weights."""
    d = tmp_path / "resnet18.a1_in1k"
    d.mkdir()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if weights == "model.safetensors":
        from safetensors.torch import save_file

        save_file(sd, d / weights)
    else:
        torch.save(sd, d / weights)
    cfg = {"architecture": "resnet18", "num_classes": 10, "num_features": 512, "global_pool": "avg",
           "pretrained_cfg": pretrained_cfg, **config}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


A1 = {"tag": "a1_in1k", "custom_load": False, "input_size": [3, 224, 224], "test_input_size": [3, 288, 288],
      "fixed_input_size": False, "interpolation": "bicubic", "crop_pct": 0.95, "test_crop_pct": 1.0,
      "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 10,
      "pool_size": [7, 7], "first_conv": "conv1", "classifier": "fc"}


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_timm_directory_converts_with_its_config(finetuned, tmp_path, capsys, weights):
    """timm's eval transform for the a1 recipe: resize floor(224 / 0.95) = 235, bicubic, center crop 224; the
    tag names the weights and label_names label the classes. Logits as timm's pipeline feeds the model."""
    model, _ = finetuned
    names = [f"kind {i}" for i in range(10)]
    d = timm_dir(tmp_path, model, A1, weights=weights, label_names=names)
    out = tmp_path / "r18.gguf"
    assert convert_main([str(d), str(out)]) == 0, capsys.readouterr().err
    mf = loader.read(out)
    assert (mf.preprocessing.resize, mf.preprocessing.crop, mf.preprocessing.interpolation) == (235, 224, "bicubic")
    assert (mf.weights_name, mf.labels) == ("a1_in1k", tuple(names))
    img = photo(seed=1)
    want = owners_logits(model, img, resize=235, crop=224, interpolation="bicubic")
    with pyggml_resnet.load(out, threads=2) as m:
        assert rel_l2(m.logits(m.preprocess(img)[None]), want) <= BOUND
    # Options still win over the config (here: timm's test size, 288 at crop_pct 1.0).
    assert convert_main([str(d), str(tmp_path / "t.gguf"), "--resize", "288", "--crop", "288"]) == 0
    assert (loader.read(tmp_path / "t.gguf").preprocessing.resize, loader.read(tmp_path / "t.gguf").preprocessing
            .interpolation) == (288, "bicubic")


@pytest.mark.parametrize("cfg, want", [
    ({"crop_mode": "squash", "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
     dict(resize=(224, 224), crop=224, mean=HALF, std=HALF, interpolation="bicubic")),
    ({"crop_mode": "squash", "crop_pct": 0.875, "input_size": [3, 192, 256], "interpolation": "bilinear"},
     dict(resize=(219, 292), crop=(192, 256), interpolation="bilinear")),
    ({}, dict(resize=256, crop=224, interpolation="bicubic")),  # timm's defaults: crop_pct 0.875, bicubic
])
def test_timm_crop_modes(finetuned, tmp_path, capsys, cfg, want):
    model, _ = finetuned
    d = timm_dir(tmp_path, model, cfg)
    assert convert_main([str(d), str(tmp_path / "m.gguf")]) == 0, capsys.readouterr().err
    got = loader.read(tmp_path / "m.gguf").preprocessing
    expected = arch.Preprocessing(**{"mean": got.mean, "std": got.std, **want})
    assert got == expected
    assert np.allclose(got.mean, want.get("mean", arch.Preprocessing.mean))


@pytest.mark.parametrize("cfg, match", [
    ({"crop_mode": "border"}, r"crop_mode 'border' .* known: 'center' \(square sizes\) and 'squash'"),
    ({"input_size": [3, 224]}, r"input_size must be \[3, height, width\], got \[3, 224\]"),
    ({"crop_pct": "0.9"}, "crop_pct must be a number"),
    ({"interpolation": "random"}, "unknown interpolation 'random'"),
])
def test_timm_configs_we_cannot_record_are_refused(finetuned, tmp_path, capsys, cfg, match):
    model, _ = finetuned
    d = timm_dir(tmp_path, model, {**A1, **cfg})
    assert convert_main([str(d), str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {d / 'config.json'}: ") and re.search(match, err), err
    assert not (tmp_path / "m.gguf").exists()


def test_directories_that_are_not_timm_models(finetuned, tmp_path, capsys):
    model, _ = finetuned
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match="is a directory without config.json: give a checkpoint file"):
        pyggml_resnet.convert.read_checkpoint(empty)
    d = timm_dir(tmp_path, model, A1)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="needs its weights, model.safetensors or pytorch_model.bin"):
        pyggml_resnet.convert.read_checkpoint(d)
    (d / "config.json").write_text('{"architecture": "resnet18"}')
    with pytest.raises(ModelFormatError, match="no 'pretrained_cfg' object"):
        pyggml_resnet.convert.read_checkpoint(d)
