"""pyggml_resnet.convert: checkpoint (.pth or legacy .bin) -> GGUF, read back with gguf's own reader.

The checkpoints come from tests/reference_resnet.py (torchvision's state_dict layout, seeded weights).
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from pyggml_resnet import arch, atomic, convert as cv
from pyggml_resnet.errors import InputError, ModelFormatError
from pyggml_resnet.labels import imagenet_labels
from reference_resnet import make_model, resnet

Q = gguf.GGMLQuantizationType
MAGIC = 0x67676D6C
GGUF_HEADER_FIELDS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}

with torch.device("meta"):
    # A legacy .bin holds one record per state_dict entry: record i is R18_RECORDS[i].
    R18_RECORDS = list(resnet(18, num_classes=10).state_dict())
rec = R18_RECORDS.index


# ----------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def models():
    """{name: torch state_dict} for the models these tests convert."""
    return {
        "r18": make_model(18, num_classes=10).state_dict(),
        "r18_imagenet": make_model(18, seed=1).state_dict(),
        "r50": make_model(50, seed=2, num_classes=10).state_dict(),
    }


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, models):
    d = tmp_path_factory.mktemp("ckpt")
    for name, sd in models.items():
        torch.save(sd, d / f"{name}.pth")
    for name in ("r18", "r50"):
        write_legacy_bin(d / f"{name}.bin", models[name])
    return d


@pytest.fixture(scope="module")
def r18_legacy(tmp_path_factory, models) -> tuple[bytes, list[int]]:
    """The resnet18 (10 classes) legacy .bin's bytes, and the offset of each record."""
    path = tmp_path_factory.mktemp("legacy") / "r18.bin"
    offsets = write_legacy_bin(path, models["r18"])
    return path.read_bytes(), offsets


def inference_arrays(sd) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def write_legacy_bin(path: Path, sd) -> list[int]:
    """The design document's converter: magic, then per state_dict entry (num_batches_tracked included) an
    int32 n_dims, the squeezed dims reversed, float32 data. Returns each record's offset."""
    offsets = []
    with open(path, "wb") as f:
        f.write(struct.pack("<i", MAGIC))
        for t in sd.values():
            a = t.detach().squeeze().numpy().astype("<f4")
            offsets.append(f.tell())
            f.write(struct.pack(f"<i{a.ndim}i", a.ndim, *reversed(a.shape)))
            f.write(a.tobytes())
    return offsets


def read_gguf(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if k not in GGUF_HEADER_FIELDS}
    types = {k: [t.name for t in f.types] for k, f in r.fields.items()}
    return r, meta, types


def dequantized(t) -> np.ndarray:
    """The tensor's values as float32, in the reader's numpy (PyTorch-order) shape, flattened past axis 0."""
    # 2-D because gguf dequantizes row by row and is very slow on a 3x3 kernel's short rows.
    data = t.data.reshape(t.data.shape[0], -1) if t.data.ndim > 1 else t.data
    return gguf.quants.dequantize(data, t.tensor_type)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def dir_listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def save(tmp_path, obj, name="model.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# f32: exact, with every metadata key


@pytest.mark.parametrize("model, depth, num_classes", [("r18_imagenet", 18, 1000), ("r50", 50, 10)])
def test_f32_round_trip(models, ckpt_dir, tmp_path, model, depth, num_classes):
    out = cv.convert(ckpt_dir / f"{model}.pth", tmp_path / "m.gguf", progress=False)
    assert out == tmp_path / "m.gguf"
    cfg = arch.CONFIGS[depth]
    r, meta, types = read_gguf(out)

    labels = list(imagenet_labels()) if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    assert meta == {
        "general.architecture": "resnet",
        arch.Key.NAME: f"resnet{depth}",
        arch.Key.DEPTH: depth,
        arch.Key.BLOCK: cfg.block,
        arch.Key.LAYERS: list(cfg.layers),
        arch.Key.WIDTH: 64,
        arch.Key.GROUPS: 1,
        arch.Key.NUM_CLASSES: num_classes,
        arch.Key.BN_EPS: float(np.float32(1e-5)),
        arch.Key.LABELS: labels,
        arch.Key.WEIGHTS: "custom",
        arch.Key.RESIZE: 256,
        arch.Key.CROP: 224,
        arch.Key.MEAN: [float(np.float32(v)) for v in (0.485, 0.456, 0.406)],
        arch.Key.STD: [float(np.float32(v)) for v in (0.229, 0.224, 0.225)],
        arch.Key.INTERPOLATION: "bilinear",
    }
    assert types[arch.Key.DEPTH] == types[arch.Key.WIDTH] == types[arch.Key.GROUPS] == ["UINT32"]
    assert types[arch.Key.NUM_CLASSES] == ["UINT32"]
    assert types[arch.Key.RESIZE] == types[arch.Key.CROP] == ["UINT32"]
    assert types[arch.Key.LAYERS] == ["ARRAY", "UINT32"]
    assert types[arch.Key.BN_EPS] == ["FLOAT32"]
    assert types[arch.Key.MEAN] == types[arch.Key.STD] == ["ARRAY", "FLOAT32"]
    assert types[arch.Key.LABELS] == ["ARRAY", "STRING"]

    expected = arch.expected_tensors(cfg, num_classes)
    arrays = inference_arrays(models[model])
    assert [t.name for t in r.tensors] == list(expected) == list(arrays)
    for t in r.tensors:
        assert t.tensor_type == Q.F32, t.name
        assert tuple(int(d) for d in t.shape) == expected[t.name][::-1], t.name  # GGUF stores ggml order
        assert np.array_equal(bits(t.data.reshape(expected[t.name])), bits(arrays[t.name])), t.name


def test_metadata_options_and_labels(ckpt_dir, tmp_path):
    names = [f"thing {i}" for i in range(10)]
    pre = arch.Preprocessing(resize=232, crop=200, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0),
                             interpolation="bicubic")
    out = cv.convert(ckpt_dir / "r18.pth", tmp_path / "m.gguf", weights="IMAGENET1K_V2", preprocessing=pre,
                     labels=names, arch="resnet18", progress=False)
    _, meta, _ = read_gguf(out)
    assert meta[arch.Key.LABELS] == names
    assert meta[arch.Key.WEIGHTS] == "IMAGENET1K_V2"
    assert (meta[arch.Key.RESIZE], meta[arch.Key.CROP]) == (232, 200)
    assert meta[arch.Key.MEAN] == [0.5, 0.5, 0.5] and meta[arch.Key.STD] == [0.25, 0.5, 1.0]
    assert meta[arch.Key.INTERPOLATION] == "bicubic"


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=["a"] * 9), "10 strings"),
    (dict(labels=list(range(10))), "10 strings"),
    (dict(dtype="q4_0"), "dtype"),
    (dict(weights=""), "weights"),
    (dict(preprocessing=arch.Preprocessing(crop=0)), "crop"),
    (dict(preprocessing=arch.Preprocessing(interpolation="cubic")), "interpolation"),  # lanczos is Pillow's
    (dict(preprocessing=arch.Preprocessing(resize=256, crop=None)), "without a crop"),
    (dict(preprocessing=arch.Preprocessing(interpolation="nearest", antialias=False)), "antialias"),
    (dict(arch="resnet99"), "resnet99"),
])
def test_bad_options_refused(ckpt_dir, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        cv.convert(ckpt_dir / "r18.pth", tmp_path / "m.gguf", progress=False, **kwargs)
    assert dir_listing(tmp_path) == []


def test_preprocessing_the_loader_refuses_is_not_written(ckpt_dir, tmp_path, capsys, monkeypatch):
    """--resize 10000 fits the file's UINT32 but not the loader's 1..8192: refused before any file is made."""
    monkeypatch.setattr(cv.write.atomic, "replacing", lambda out: pytest.fail(f"{out} was about to be written"))
    assert cv.main([str(ckpt_dir / "r18.pth"), str(tmp_path / "m.gguf"), "--resize", "10000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: resize must be an integer in 1..8192, got 10000"), err
    assert dir_listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# f16, bf16, q8_0


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision(models, ckpt_dir, tmp_path, dtype):
    out = cv.convert(ckpt_dir / "r18.pth", tmp_path / "m.gguf", dtype=dtype, progress=False)
    r, meta, _ = read_gguf(out)
    expected = arch.expected_tensors(arch.CONFIGS[18], 10)
    arrays = inference_arrays(models["r18"])
    torch_type = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for t in r.tensors:
        shape = expected[t.name]
        assert tuple(int(d) for d in t.shape) == shape[::-1], t.name
        value = dequantized(t).reshape(shape)
        if len(shape) >= 2:  # conv and fc weights
            assert t.tensor_type == {"f16": Q.F16, "bf16": Q.BF16}[dtype], t.name
            # torch's round-to-nearest-even conversion, an independent implementation of the same rounding.
            want = torch.from_numpy(arrays[t.name]).to(torch_type).float().numpy()
            assert np.array_equal(value, want), t.name
            rel = 2.0**-11 if dtype == "f16" else 2.0**-8
            assert np.all(np.abs(value - arrays[t.name]) <= rel * np.abs(arrays[t.name]) + 1e-7), t.name
        else:  # BatchNorm vectors and fc.bias stay exact
            assert t.tensor_type == Q.F32, t.name
            assert np.array_equal(bits(value), bits(arrays[t.name])), t.name


def test_q8_0(models, ckpt_dir, tmp_path):
    out = cv.convert(ckpt_dir / "r50.pth", tmp_path / "m.gguf", dtype="q8_0", progress=False)
    r, _, _ = read_gguf(out)
    expected = arch.expected_tensors(arch.CONFIGS[50], 10)
    arrays = inference_arrays(models["r50"])
    assert [t.name for t in r.tensors] == list(expected)
    seen = set()
    for t in r.tensors:
        shape, want = expected[t.name], arrays[t.name]
        if t.name == "conv1.weight":  # 3*7*7 = 147 is not a whole number of 32-blocks: kept f32, 4-D
            assert t.tensor_type == Q.F32 and tuple(int(d) for d in t.shape) == (7, 7, 3, 64)
            assert np.array_equal(bits(dequantized(t).reshape(shape)), bits(want))
        elif len(shape) >= 2:  # flattened (OC, IC*KH*KW), ggml order reversed
            row = int(np.prod(shape[1:]))
            assert t.tensor_type == Q.Q8_0, t.name
            assert tuple(int(d) for d in t.shape) == (row, shape[0]), t.name
            got = dequantized(t)
            assert got.shape == (shape[0], row)
            # Per block of 32: scale d = max|x|/127 (stored f16), error <= d/2 plus the scale's rounding.
            blocks = want.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert np.all(err <= 0.6 * d + 1e-12), t.name
            seen.add(shape[2:] if len(shape) == 4 else "fc")
        else:
            assert t.tensor_type == Q.F32, t.name
            assert np.array_equal(bits(dequantized(t)), bits(want)), t.name
    assert seen == {(1, 1), (3, 3), "fc"}


def test_f16_range_refused(tmp_path, models):
    sd = dict(models["r18"])
    sd["layer2.0.conv1.weight"] = sd["layer2.0.conv1.weight"].clone()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = 1e6
    path = save(tmp_path, sd)
    with pytest.raises(ModelFormatError, match="layer2.0.conv1.weight.*F16"):
        cv.convert(path, tmp_path / "m.gguf", dtype="f16", progress=False)
    assert dir_listing(tmp_path) == ["model.pth"]
    cv.convert(path, tmp_path / "m.gguf", dtype="bf16", progress=False)  # bf16 has f32's range


# ----------------------------------------------------------------------------------------------------------
# PyTorch checkpoints: containers, prefixes, refusals


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd, "epoch": 90},
    lambda sd: prefixed("module.", sd),
    lambda sd: {"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": prefixed("module.", sd)},
    # PyTorch Lightning: the LightningModule's attribute names every key, other modules' weights beside it
    lambda sd: {"epoch": 3, "global_step": 300, "pytorch-lightning_version": "2.4.0",
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "hyper_parameters": {"lr": 0.1},
                "state_dict": {**prefixed("model.", sd), "criterion.weight": torch.ones(10)}},
    lambda sd: prefixed("_orig_mod.", sd),  # torch.compile
    lambda sd: prefixed("module._orig_mod.", sd),  # compiled, then DistributedDataParallel
    lambda sd: {"epoch": 1, "model_state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "loss": 0.5},  # the PyTorch tutorial's "saving a general checkpoint"
], ids=["state_dict", "model", "module.", "state_dict+module.", "lightning", "compile", "ddp-compile", "tutorial"])
def test_wrapped_checkpoints(models, tmp_path, wrap):
    state = cv.read_checkpoint(save(tmp_path, wrap(models["r18"]))).state
    want = inference_arrays(models["r18"])
    assert list(state) == list(want)
    for name, value in want.items():
        assert state[name].dtype == np.float32 and np.array_equal(bits(state[name]), bits(value)), name


def test_several_resnets_refused(models, tmp_path):
    path = save(tmp_path, {**prefixed("student.", models["r18"]), **prefixed("teacher.", models["r18"])})
    with pytest.raises(ModelFormatError, match="holds several ResNets, under 'student.', 'teacher.': save the "
                                               "one to convert as a state_dict of its own"):
        cv.read_checkpoint(path)


def test_lightning_checkpoint_missing_a_tensor_names_it(models, tmp_path):
    sd = prefixed("model.", models["r18"])
    del sd["model.conv1.weight"]
    with pytest.raises(ModelFormatError, match=r"last\.ckpt: tensors do not match resnet18 with 10 classes: "
                                               r"missing \['conv1\.weight'\]$"):
        cv.read_checkpoint(save(tmp_path, {"state_dict": sd}, "last.ckpt"))


def test_whole_pickled_model_refused_with_advice(tmp_path):
    """torch.save(model) pickles the class: loading it would import and run code. Say what to do instead."""
    path = tmp_path / "whole.pth"
    torch.save(make_model(18, num_classes=10), path)
    with pytest.raises(ModelFormatError) as info:
        cv.convert(path, tmp_path / "m.gguf", progress=False)
    assert str(info.value) == (
        f"{path} holds a whole pickled model (reference_resnet.ResNet), not a state_dict: loading it would run "
        "code from the file, so it is not read. Where the model's code is, save its weights with "
        "torch.save(model.state_dict(), 'weights.pth') and convert that file")
    assert dir_listing(tmp_path) == ["whole.pth"]


@pytest.mark.parametrize("torch_there", [True, False], ids=["torch", "numpy"])
@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: prefixed("model.", sd)], ids=["plain", "prefixed"])
def test_safetensors(models, tmp_path, monkeypatch, torch_there, wrap):
    """timm's and Hugging Face's format, through the safetensors package: with torch, or NumPy alone."""
    from safetensors.torch import save_file

    sd = {k: v for k, v in models["r18"].items()}
    sd["fc.weight"] = sd["fc.weight"].half()  # widened exactly, as from a .pth
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in wrap(sd).items()}, path)
    if not torch_there:
        monkeypatch.setattr(cv.readers, "_torch_or_none", lambda: None)
    state = cv.read_checkpoint(path).state
    want = inference_arrays(sd)
    assert sorted(state) == sorted(want)  # safetensors keeps names sorted; the writer follows torchvision's order
    for name, value in want.items():
        assert state[name].dtype == np.float32 and np.array_equal(state[name], value.astype(np.float32)), name


def test_safetensors_bfloat16_without_torch(models, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "bf16.safetensors"
    save_file({k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in models["r18"].items()},
              path)
    want = models["r18"]["fc.weight"].bfloat16().float().numpy()
    state = cv.read_checkpoint(path).state  # torch reads bfloat16
    assert np.array_equal(state["fc.weight"], want)
    monkeypatch.setattr(cv.readers, "_torch_or_none", lambda: None)
    if importlib.util.find_spec("ml_dtypes"):  # NumPy reads it, through ml_dtypes' bfloat16
        assert np.array_equal(cv.read_checkpoint(path).state["fc.weight"], want)
    # With neither, refused with what to install. A fresh interpreter: NumPy keeps a type once ml_dtypes taught it.
    code = ("import sys; sys.modules['torch'] = sys.modules['ml_dtypes'] = None\n"
            "from pyggml_resnet import convert\nfrom pyggml_resnet.errors import ModelFormatError\n"
            f"try:\n    convert.read_checkpoint({str(path)!r})\n"
            "except ModelFormatError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert re.search(r"cannot be read as a safetensors file: .*bfloat16.*; install torch or ml_dtypes to read "
                     r"bfloat16 tensors$", out.stdout.strip()), out.stdout + out.stderr


def test_corrupt_safetensors_refused(models, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cut.safetensors"
    save_file({k: v.contiguous() for k, v in models["r18"].items()}, path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFormatError, match="cut.safetensors cannot be read as a safetensors file"):
        cv.convert(path, tmp_path / "m.gguf", progress=False)
    assert dir_listing(tmp_path) == ["cut.safetensors"]


def test_half_checkpoint_is_widened(models, tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in models["r18"].items()}
    state = cv.read_checkpoint(save(tmp_path, sd)).state
    assert all(v.dtype == np.float32 for v in state.values())
    assert np.array_equal(state["fc.weight"], sd["fc.weight"].float().numpy())


def _mutated(sd, **changes):
    sd = dict(sd)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del sd[name]
        else:
            sd[name] = value
    return sd


def _with_value(sd, name, index, value):
    t = sd[name].clone()
    t.view(-1)[index] = value
    return _mutated(sd, **{name.replace(".", "__"): t})


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: _mutated(sd, layer2__0__bn1__running_var=None), r"missing \['layer2\.0\.bn1\.running_var'\]"),
    (lambda sd: _mutated(sd, layer3__1__extra__weight=torch.ones(4)), r"unexpected \['layer3\.1\.extra\.weight'\]"),
    (lambda sd: _mutated(sd, layer3__1__conv2__weight=torch.ones(256, 256, 1, 1)),
     r"wrong shape: layer3\.1\.conv2\.weight \(256, 256, 1, 1\) \(expected \(256, 256, 3, 3\)\)"),
    (lambda sd: _mutated(sd, fc__bias=torch.ones(11)), r"fc\.bias \(11,\) \(expected \(10,\)\)"),
    (lambda sd: _with_value(sd, "layer4.1.bn2.bias", 5, float("nan")), r"layer4\.1\.bn2\.bias holds 1 NaN"),
    (lambda sd: _with_value(sd, "layer1.0.conv1.weight", 7, float("-inf")), r"layer1\.0\.conv1\.weight holds 1"),
    # A block's first conv missing once made it look like a ResNet with no such block ("no torchvision
    # ResNet has basic blocks [2, 0, 2, 2]"): the message names the tensor.
    (lambda sd: _mutated(sd, layer2__0__conv1__weight=None),
     r"model\.pth: tensors do not match resnet18 with 10 classes: missing \['layer2\.0\.conv1\.weight'\]$"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("layer4.1.")},
     r"model\.pth: tensors do not match resnet18 with 10 classes: missing \['layer4\.1\.conv1\.weight', "
     r"'layer4\.1\.bn1\.weight', 'layer4\.1\.bn1\.bias', 'layer4\.1\.bn1\.running_mean', "
     r"'layer4\.1\.bn1\.running_var'\] and 5 more$"),
    (lambda sd: _mutated(sd, layer3__40__conv1__weight=torch.ones(256, 256, 3, 3)),
     r"no torchvision ResNet has basic blocks \[2, 2, 41, 2\]"),
    (lambda sd: _mutated(sd, fc__weight=None), r"fc\.weight"),
    (lambda sd: _mutated(sd, fc__bias=torch.ones(10, dtype=torch.int64)), r"fc\.bias has dtype torch\.int64"),
    (lambda sd: _mutated(sd, fc__bias=[0.0] * 10), r"'fc\.bias' is a list, not a tensor"),
    (lambda sd: [1, 2, 3], "holds a list, not a state_dict"),
], ids=["missing", "extra", "misshapen", "fc-bias", "nan", "inf", "missing-first-conv", "missing-block",
        "unknown-layers", "no-fc", "int", "list", "not-dict"])
def test_bad_state_dict_refused(models, tmp_path, mutate, match):
    path = save(tmp_path, mutate(models["r18"]))
    with pytest.raises(ModelFormatError, match=match):
        cv.convert(path, tmp_path / "m.gguf", progress=False)
    assert dir_listing(tmp_path) == ["model.pth"]


def test_wrong_arch_refused(ckpt_dir, tmp_path):
    with pytest.raises(ModelFormatError, match="holds a resnet18 .* not the resnet34"):
        cv.convert(ckpt_dir / "r18.pth", tmp_path / "m.gguf", arch="resnet34", progress=False)


def test_write_gguf_checks_its_input(models, tmp_path):
    state = inference_arrays(models["r18"])
    del state["layer1.1.bn2.bias"]
    with pytest.raises(ModelFormatError, match=r"layer1\.1\.bn2\.bias"):
        cv.write_gguf(cv.Checkpoint.of(state), tmp_path / "m.gguf", progress=False)
    assert dir_listing(tmp_path) == []


class RunsCode:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = save(tmp_path, {"state_dict": {"conv1.weight": torch.ones(1)}, "hook": RunsCode(marker)})
    with pytest.raises(ModelFormatError, match="not a weights-only PyTorch checkpoint"):
        cv.read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"],
                         ids=["empty", "text", "bad-zip"])
def test_garbage_file_refused(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ModelFormatError, match="not a weights-only PyTorch checkpoint"):
        cv.read_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------
# Legacy .bin


@pytest.mark.parametrize("model", ["r18", "r50"])
def test_legacy_bin_converts_like_pth(ckpt_dir, tmp_path, model):
    from_pth = cv.read_checkpoint(ckpt_dir / f"{model}.pth").state
    from_bin = cv.read_checkpoint(ckpt_dir / f"{model}.bin").state
    assert list(from_bin) == list(from_pth)
    for name in from_pth:
        assert from_bin[name].shape == from_pth[name].shape, name  # unsqueezed back
        assert np.array_equal(bits(from_bin[name]), bits(from_pth[name])), name
    # The whole GGUF file is the same, byte for byte.
    a = cv.convert(ckpt_dir / f"{model}.pth", tmp_path / "a.gguf", progress=False)
    b = cv.convert(ckpt_dir / f"{model}.bin", tmp_path / "b.gguf", arch=f"resnet{model[1:]}", progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_legacy_detected_by_magic_not_extension(models, ckpt_dir, tmp_path):
    path = tmp_path / "resnet.weights"
    path.write_bytes((ckpt_dir / "r18.bin").read_bytes())
    assert list(cv.read_checkpoint(path).state) == list(inference_arrays(models["r18"]))


def test_legacy_num_classes_1_squeezed_fc(tmp_path):
    """With one class the legacy converter squeezed fc.weight to 1-D and fc.bias to a scalar."""
    sd = make_model(18, num_classes=1, calib_batches=1).state_dict()
    write_legacy_bin(tmp_path / "m.bin", sd)
    state = cv.read_checkpoint(tmp_path / "m.bin").state
    assert state["fc.weight"].shape == (1, 512) and state["fc.bias"].shape == (1,)
    assert np.array_equal(state["fc.weight"], sd["fc.weight"].numpy())




@pytest.mark.parametrize("edit, match", [
    (lambda b, o: b"lmgh" + b[4:], "not a weights-only PyTorch checkpoint"),
    (lambda b, o: b[: o[rec("layer2.0.conv1.weight")] + 4 + 4 * 4 + 100],
     rf"record {rec('layer2.0.conv1.weight')}: header has dims \[3, 3, 64, 128\] .* only 100 bytes are left "
     r".*expected layer2\.0\.conv1\.weight \(128, 64, 3, 3\) \(resnet18\)"),
    (lambda b, o: b[: o[40] + 6], rf"record 40: the file ends inside the record header; expected {R18_RECORDS[40]}"),
    (lambda b, o: b[: o[3]] + struct.pack("<i", 9) + b[o[3] + 4:],
     r"record 3: header says n_dims = 9, expected 0\.\.4; expected bn1\.running_mean \(64,\)"),
    (lambda b, o: b[: o[6] + 4] + struct.pack("<i", -3) + b[o[6] + 8:],
     r"record 6: header has dims \[-3, 3, 64, 64\], every dimension must be positive; expected layer1\.0\.conv1"),
    (lambda b, o: b[: o[6] + 4] + struct.pack("<4i", 3, 3, 32, 128) + b[o[6] + 20:],
     r"record 6: shape \(128, 32, 3, 3\) does not match layer1\.0\.conv1\.weight \(64, 64, 3, 3\)"),
    (lambda b, o: b + b"\0" * 8, r"8 bytes of trailing data after record 121 \(fc\.bias\), the last tensor of resnet18"),
    (lambda b, o: b + b"\1\2", r"2 bytes of trailing data"),
    (lambda b, o: b[:4], r"record 0: the file ends after 0 records; expected next conv1\.weight \(64, 3, 7, 7\)"),
    (lambda b, o: b[: o[100]], rf"record 100: the file ends after 100 records; expected next {R18_RECORDS[100]}"),
], ids=["bad-magic", "truncated-data", "truncated-header", "n_dims-9", "negative-dim", "wrong-shape",
        "trailing", "trailing-short", "only-magic", "missing-records"])
def test_malformed_legacy_bin_refused(r18_legacy, tmp_path, edit, match):
    path = tmp_path / "m.bin"
    path.write_bytes(edit(*r18_legacy))
    with pytest.raises(ModelFormatError, match=match):
        cv.convert(path, tmp_path / "m.gguf", progress=False)
    assert dir_listing(tmp_path) == ["m.bin"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_legacy_bin_only_raises_model_format_error(r18_legacy, tmp_path, data):
    """Truncated anywhere, or any header field overwritten with any int32: refused cleanly, never a crash."""
    good, offsets = r18_legacy
    if data.draw(st.booleans(), label="truncate"):
        bad = good[: data.draw(st.integers(0, len(good) - 1), label="length")]
    else:
        i = data.draw(st.integers(0, len(offsets) - 1), label="record")
        n_dims = struct.unpack_from("<i", good, offsets[i])[0]
        at = offsets[i] + 4 * data.draw(st.integers(0, n_dims), label="field")
        value = data.draw(st.integers(-(2**31), 2**31 - 1), label="value")
        bad = good[:at] + struct.pack("<i", value) + good[at + 4:]
    if bad == good:
        return
    (tmp_path / "bad.bin").write_bytes(bad)
    with pytest.raises(ModelFormatError):
        cv.read_checkpoint(tmp_path / "bad.bin")


def test_legacy_bin_with_wrong_arch(ckpt_dir):
    # resnet34 has a third block in layer1 where resnet18's layer2 starts (record 30).
    with pytest.raises(ModelFormatError, match=r"record 30: .*layer1\.2\.conv1\.weight \(64, 64, 3, 3\) \(resnet34\)"):
        cv.read_checkpoint(ckpt_dir / "r18.bin", arch="resnet34")


# ----------------------------------------------------------------------------------------------------------
# Atomic output


def _fail_after(monkeypatch, n, exc):
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def write_tensor_data(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)
    return calls


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failure_midway_leaves_nothing(ckpt_dir, tmp_path, monkeypatch, exc):
    calls = _fail_after(monkeypatch, 20, exc)
    with pytest.raises(type(exc)):
        cv.convert(ckpt_dir / "r18.pth", tmp_path / "m.gguf", progress=False)
    assert len(calls) == 21  # it really failed partway through the tensors
    assert dir_listing(tmp_path) == []


def test_sigterm_midway_is_reported_with_its_status(ckpt_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM while writing arrives as atomic.Terminated (test_atomic.py sends the real signal): the command
    line says nothing was written and returns 143, as a process SIGTERM ended reports to a shell."""
    _fail_after(monkeypatch, 5, atomic.Terminated())
    assert cv.main([str(ckpt_dir / "r18.pth"), str(tmp_path / "m.gguf")]) == 143
    assert capsys.readouterr().err.endswith("\nterminated; nothing written\n")
    assert dir_listing(tmp_path) == []


def test_failure_keeps_existing_output(ckpt_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF previous model")
    _fail_after(monkeypatch, 5, OSError("disk full"))
    with pytest.raises(OSError):
        cv.convert(ckpt_dir / "r18.pth", out, progress=False)
    assert out.read_bytes() == b"GGUF previous model"
    with pytest.raises(ModelFormatError):  # a refused checkpoint does not touch it either
        cv.convert(ckpt_dir / "r18.pth", out, arch="resnet50", progress=False)
    assert out.read_bytes() == b"GGUF previous model"
    assert dir_listing(tmp_path) == ["m.gguf"]


def test_success_replaces_output_with_normal_mode(ckpt_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF previous model")
    cv.convert(ckpt_dir / "r18.pth", out, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"
    assert dir_listing(tmp_path) == ["m.gguf"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "symlinked-input"])
def test_output_that_is_the_input_refused(ckpt_dir, tmp_path, how):
    """`convert same.pth same.pth` replaced the checkpoint with GGUF data; so did any other name for it."""
    src = tmp_path / "model.pth"
    src.write_bytes((ckpt_dir / "r18.pth").read_bytes())
    before = src.read_bytes()
    if how == "same":
        args = (src, src)
    elif how == "symlink":
        (tmp_path / "link.pth").symlink_to("model.pth")
        args = (src, tmp_path / "link.pth")
    elif how == "hardlink":
        os.link(src, tmp_path / "link.pth")
        args = (src, tmp_path / "link.pth")
    else:
        (tmp_path / "link.pth").symlink_to("model.pth")
        args = (tmp_path / "link.pth", src)
    via = "" if how == "same" else " (through a link: the same file)"
    with pytest.raises(InputError) as info:
        cv.convert(*args, progress=False)
    assert str(info.value) == (f"output {args[1]} is the input {args[0]}{via}; writing it would destroy the "
                               "checkpoint: give another output name")
    assert src.read_bytes() == before
    assert sorted(dir_listing(tmp_path)) == sorted(["model.pth"] + (["link.pth"] if how != "same" else []))


def test_reencode_in_place_refused(ckpt_dir, tmp_path):
    out = tmp_path / "m.gguf"
    cv.convert(ckpt_dir / "r18.pth", out, progress=False)
    before = out.read_bytes()
    with pytest.raises(InputError, match="is the input"):
        cv.convert(out, out, dtype="bf16", progress=False)
    assert out.read_bytes() == before


@pytest.mark.parametrize("force", [False, True])
def test_existing_file_that_is_not_gguf_needs_force(ckpt_dir, tmp_path, force):
    out = tmp_path / "notes.txt"
    out.write_text("my notes, not a model\n")
    if not force:
        with pytest.raises(InputError) as info:
            cv.convert(ckpt_dir / "r18.pth", out, progress=False)
        assert str(info.value) == (f"output {out} exists and is not a GGUF file: not replacing it (pass --force, "
                                   "or force=True, to replace it)")
        assert out.read_text() == "my notes, not a model\n"
    else:
        cv.convert(ckpt_dir / "r18.pth", out, progress=False, force=True)
        assert out.read_bytes()[:4] == b"GGUF"
    assert dir_listing(tmp_path) == ["notes.txt"]
    # write_gguf guards its output the same way
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(InputError, match="exists and is not a GGUF file"):
        cv.write_gguf(cv.read_checkpoint(ckpt_dir / "r18.pth"), tmp_path / "other.txt", progress=False)
    # an empty file holds nothing to lose
    (tmp_path / "empty.gguf").touch()
    cv.convert(ckpt_dir / "r18.pth", tmp_path / "empty.gguf", progress=False)


def test_output_special_file_refused(ckpt_dir, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="exists and is not a regular file"):
        cv.convert(ckpt_dir / "r18.pth", fifo, progress=False, force=True)
    assert dir_listing(tmp_path) == ["fifo"] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_output_directory_refused(ckpt_dir, tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        cv.convert(ckpt_dir / "r18.pth", tmp_path, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        cv.convert(ckpt_dir / "r18.pth", tmp_path / "no" / "m.gguf", progress=False)
    assert dir_listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyggml_resnet.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_success(ckpt_dir, tmp_path):
    out = tmp_path / "m.gguf"
    p = run_cli(ckpt_dir / "r50.pth", out, "--dtype", "q8_0", "--weights", "MINE", "--resize", "232")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    assert all(w in lines[0] for w in ("resnet50", "267 tensors", "23,528,522 parameters", " MB", "q8_0"))
    _, meta, _ = read_gguf(out)
    assert meta[arch.Key.WEIGHTS] == "MINE" and meta[arch.Key.RESIZE] == 232 and meta[arch.Key.CROP] == 224


@pytest.mark.parametrize("content", [b"garbage", struct.pack("<ii", MAGIC, 9)], ids=["pth", "bin"])
def test_cli_bad_checkpoint(tmp_path, content):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    p = run_cli(bad, tmp_path / "m.gguf")
    assert p.returncode == 1
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert dir_listing(tmp_path) == ["bad.pth"]


def test_cli_refuses_to_overwrite(ckpt_dir, tmp_path):
    src = tmp_path / "same.pth"
    src.write_bytes((ckpt_dir / "r18.pth").read_bytes())
    p = run_cli(src, src)
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == (f"error: output {src} is the input {src}; writing it would destroy the checkpoint: give "
                        "another output name\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    p = run_cli(src, notes)
    assert p.returncode == 1 and p.stderr == (f"error: output {notes} exists and is not a GGUF file: not replacing "
                                              "it (pass --force, or force=True, to replace it)\n")
    assert notes.read_text() == "mine" and src.read_bytes() == (ckpt_dir / "r18.pth").read_bytes()
    p = run_cli(src, notes, "--force")
    assert p.returncode == 0 and notes.read_bytes()[:4] == b"GGUF"


def test_cli_reencodes_gguf_keeping_its_metadata(ckpt_dir, tmp_path):
    """`convert model.gguf out.gguf --dtype bf16` failed inside torch.load; now it writes the same weights in
    the new type, with the input's weights name, labels and preprocessing unless the options replace them."""
    f32 = tmp_path / "f32.gguf"
    labels = [f"thing {i}" for i in range(10)]
    cv.convert(ckpt_dir / "r18.pth", f32, weights="MINE", labels=labels, progress=False,
               preprocessing=arch.Preprocessing(resize=232, crop=200, interpolation="bicubic"))
    out = tmp_path / "bf16.gguf"
    p = run_cli(f32, out, "--dtype", "bf16")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"wrote {out}: resnet18, 10 classes, 102 tensors, 11,181,642 parameters, " \
                       f"{out.stat().st_size / 1e6:.1f} MB, bf16\n"
    _, meta, _ = read_gguf(out)
    assert meta[arch.Key.WEIGHTS] == "MINE" and meta[arch.Key.LABELS] == labels
    assert (meta[arch.Key.RESIZE], meta[arch.Key.CROP], meta[arch.Key.INTERPOLATION]) == (232, 200, "bicubic")
    from pyggml_resnet import loader

    want, got = loader.read(f32).tensors(), loader.read(out).tensors()
    for name, value in want.items():  # bf16 of the f32 values: a 16-bit round to nearest even
        if value.ndim > 1:
            assert np.array_equal(got[name], torch.from_numpy(value).bfloat16().float().numpy()), name
        else:
            assert np.array_equal(got[name], value), name
    p = run_cli(out, tmp_path / "back.gguf", "--weights", "BACK", "--resize", "256")
    assert p.returncode == 0, p.stderr
    _, meta, _ = read_gguf(tmp_path / "back.gguf")
    assert (meta[arch.Key.WEIGHTS], meta[arch.Key.RESIZE], meta[arch.Key.CROP]) == ("BACK", 256, 200)


def test_cli_labels_and_interpolation(ckpt_dir, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}, with spaces\r\n" for i in range(10)), encoding="utf-8")
    out = tmp_path / "m.gguf"
    p = run_cli(ckpt_dir / "r18.pth", out, "--labels", labels, "--interpolation", "bicubic")
    assert p.returncode == 0, p.stderr
    _, meta, _ = read_gguf(out)
    assert meta[arch.Key.LABELS] == [f"class {i}, with spaces" for i in range(10)]
    assert meta[arch.Key.INTERPOLATION] == "bicubic" and meta[arch.Key.RESIZE] == 256
    labels.write_text("".join(f"c{i}\n" for i in range(9)))
    p = run_cli(ckpt_dir / "r18.pth", tmp_path / "n.gguf", "--labels", labels)
    assert p.returncode == 1 and p.stderr == "error: labels must be 10 strings (one per class), got 9\n"
    p = run_cli(ckpt_dir / "r18.pth", tmp_path / "n.gguf", "--interpolation", "cubic")  # lanczos is Pillow's
    assert p.returncode == 2 and "argument --interpolation: invalid choice: 'cubic'" in p.stderr
    assert dir_listing(tmp_path) == ["labels.txt", "m.gguf"]


def test_main_in_process(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = [str(ckpt_dir / "r18.pth"), str(out), "--dtype", "bf16", "--arch", "resnet18", "--crop", "192"]
    assert cv.main(argv) == 0
    assert "102 tensors" in capsys.readouterr().out
    _, meta, _ = read_gguf(out)
    assert meta[arch.Key.CROP] == 192 and meta[arch.Key.NAME] == "resnet18"
    assert cv.main([str(tmp_path / "missing.pth"), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pth" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# Wide ResNets, ResNeXts and timm's ResNets


@pytest.mark.parametrize("name, groups, width", [("resnext50_32x4d", 32, 4), ("wide_resnet50_2", 1, 128)])
def test_groups_and_width_are_inferred_and_written(model_files, name, groups, width):
    """The converter reads groups and width off the first 3x3 conv and records them (and torchvision's name)."""
    _, _, path = model_files(50, 10, groups=groups, width_per_group=width)  # converted without --arch
    _, meta, types = read_gguf(path)
    assert meta[arch.Key.NAME] == name
    assert (meta[arch.Key.GROUPS], meta[arch.Key.WIDTH], meta[arch.Key.DEPTH]) == (groups, width, 50)
    assert types[arch.Key.GROUPS] == types[arch.Key.WIDTH] == ["UINT32"]


def test_timm_resnet50_converts_with_timms_preprocessing(models, tmp_path, capsys):
    """timm's resnet50 weights (resnet50.a1_in1k, ...) are a torchvision state_dict; timm evaluates a1_in1k
    at test_input_size 288 with test_crop_pct 1.0 (resize 288/1.0 = 288, crop 288), bicubic."""
    ckpt = save(tmp_path, models["r50"], "resnet50_a1_in1k.pth")
    out = tmp_path / "resnet50_a1_in1k.gguf"
    argv = [str(ckpt), str(out), "--resize", "288", "--crop", "288", "--interpolation", "bicubic"]
    assert cv.main(argv) == 0, capsys.readouterr().err
    _, meta, _ = read_gguf(out)
    assert meta[arch.Key.NAME] == "resnet50"
    assert (meta[arch.Key.RESIZE], meta[arch.Key.CROP], meta[arch.Key.INTERPOLATION]) == (288, 288, "bicubic")


def _timm(sd, drop=(), rename=None, **add) -> dict[str, np.ndarray]:
    """A timm variant's state_dict made from a torchvision one: names starting with `drop` removed, others
    renamed by `rename`, and tensors of the given shapes added (their "__" read as ".")."""
    out = {}
    for k, v in inference_arrays(sd).items():
        if not k.startswith(tuple(drop)):
            out[rename(k) if rename else k] = v
    out.update({k.replace("__", "."): np.zeros(s, np.float32) for k, s in add.items()})
    return out


def _bn(prefix, c):
    return {f"{prefix}__{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")}


def _avg_down(name):
    # ResNet-D's shortcut: downsample.0 is an AvgPool2d (no weights), then the 1x1 conv and its BatchNorm.
    return name.replace(".downsample.1.", ".downsample.2.").replace(".downsample.0.", ".downsample.1.")


TIMM_VARIANTS = {
    # resnet50d: deep stem (3x3 convs of 32, 32, 64 channels) and average-pool downsample
    "resnet50d": (lambda sd: _timm(sd, drop=["conv1.", "bn1."], rename=_avg_down, conv1__0__weight=(32, 3, 3, 3),
                                   **_bn("conv1__1", 32), conv1__3__weight=(32, 32, 3, 3), **_bn("conv1__4", 32),
                                   conv1__6__weight=(64, 32, 3, 3), **_bn("bn1", 64)),
                  [r"deep stem .* e\.g\. conv1\.0\.weight", r"average-pool downsample .* layer1\.0\.downsample\.2\."]),
    "seresnet50": (lambda sd: _timm(sd, layer1__0__se__fc1__weight=(16, 256, 1, 1), layer1__0__se__fc1__bias=(16,)),
                   [r"squeeze-and-excitation .* e\.g\. layer1\.0\.se\.fc1\.weight"]),
    "resnetblur50": (lambda sd: _timm(sd, layer2__0__aa__filt=(128, 1, 3, 3)), [r"anti-aliased .* layer2\.0\.aa\.filt"]),
    "resnet50_gn": (lambda sd: {k: v for k, v in _timm(sd).items() if not k.endswith(("running_mean", "running_var"))},
                    [r"without running statistics \(GroupNorm"]),
    "resnetv2_50": (lambda sd: {("stem.conv.weight" if k == "conv1.weight" else k): v for k, v in _timm(sd).items()},
                    [r"stem/stages/head .* e\.g\. stem\.conv\.weight"]),
}


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_unsupported_timm_variants_are_refused_by_name(models, variant):
    mutate, matches = TIMM_VARIANTS[variant]
    with pytest.raises(ModelFormatError, match=r"^unsupported ResNet variant: ") as e:
        cv.Checkpoint.of(mutate(models["r50"]))
    for m in matches:
        assert re.search(m, str(e.value)), (m, str(e.value))
