"""int8 models (issue 21): converted with calibration (convert --dtype int8), loaded on the packed GEMM's int8
paths, checked against PyTorch f32 (the seeded reference ResNets, BatchNorm calibrated on data) on test images
that are not among the calibration images, against ONNX Runtime's int8 quantization of the same net, and for
bit-identical logits across batch sizes, thread counts and int8 paths."""

import importlib.util

import numpy as np
import pytest
import torch

import pyggml_resnet
from pyggml_resnet import convert
from pyggml_resnet.bench import peers
from pyggml_resnet.errors import InputError
from pyggml_resnet.ggml import gemm_int8_paths

from conftest import calibration_pictures

TEST_IMAGES = 16
# Measured on the seeded nets, 8 calibration and 16 test pictures (docs/usage.md): relative L2 error 0.0148
# (ResNet-18) and 0.0201 (ResNet-101); top-1 agreement 1.0 and 0.69 (the seeded nets' top logits lie close
# together; ONNX Runtime int8 agrees on 0.69), top-5 1.0. The bounds leave a little room.
REL_L2_BOUND = {18: 0.02, 101: 0.025}
TOP1_BOUND = {18: 0.9, 101: 0.6}


@pytest.fixture(scope="module")
def test_images():
    return peers.images(peers.TEST, TEST_IMAGES)


def torch_logits(ref, x) -> np.ndarray:
    with torch.inference_mode():
        return ref(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("depth", [18, 101])
def test_int8_logits_close_to_pytorch_f32(model_files, test_images, depth):
    ref, _, path = model_files(depth, dtype="int8")
    with pyggml_resnet.load(path, threads=2) as model:
        assert model.dtype == "int8" and model.gemm == gemm_int8_paths()[0]
        assert "int8" in repr(model) and model.gemm in repr(model)
        got = peers.agreement(model.logits(test_images), torch_logits(ref, test_images))
    assert 0 < got["rel_l2_error"] <= REL_L2_BOUND[depth], got
    assert got["top1_agreement"] >= TOP1_BOUND[depth] and got["top5_agreement"] == 1.0, got


def test_int8_bit_identical_across_batches_threads_and_paths(model_files, test_images):
    _, _, path = model_files(18, dtype="int8")
    first = None
    for gemm in gemm_int8_paths():
        with pyggml_resnet.load(path, threads=1, gemm=gemm, adapt_threads=False) as model:
            assert model.gemm == gemm
            for threads in (1, 2, 3):  # exactly these, however busy the machine (adapt_threads=False)
                model.threads = threads
                for batch in (1, 3, 8):  # 3 leaves a last batch of 1
                    got = np.concatenate([model.logits(test_images[i:i + batch])
                                          for i in range(0, TEST_IMAGES, batch)])
                    first = got if first is None else first
                    assert np.array_equal(got, first), (gemm, threads, batch)
    assert len(gemm_int8_paths()) >= 2  # this CPU compares at least two paths (AVX2 and scalar run anywhere x86)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs onnxruntime and onnx (the test extra)")
def test_int8_error_no_worse_than_onnxruntime_int8(model_files, test_images):
    ref, _, path = model_files(101, dtype="int8")
    calibration = peers.images(peers.CALIBRATION, len(calibration_pictures()))
    ort, f32 = peers.ort_int8_logits(ref, calibration, test_images)
    with pyggml_resnet.load(path, threads=2) as model:
        ours = peers.agreement(model.logits(test_images), f32)
    theirs = peers.agreement(ort, f32)
    assert ours["rel_l2_error"] <= theirs["rel_l2_error"], (ours, theirs)
    assert ours["top1_agreement"] >= theirs["top1_agreement"], (ours, theirs)
    assert ours["top5_agreement"] >= theirs["top5_agreement"], (ours, theirs)


def test_int8_options_refused(model_files):
    _, pth, int8_path = model_files(18, 10, dtype="int8")
    _, _, f32_path = model_files(18, 10)
    with pytest.raises(InputError, match="batchnorm='folded'"):
        pyggml_resnet.load(int8_path, batchnorm="explicit")
    with pytest.raises(InputError, match="--dtype int8 --calibration"):
        pyggml_resnet.load(f32_path, dtype="int8")
    with pytest.raises(InputError, match="int8 file"):
        pyggml_resnet.load(int8_path, dtype="f32")
    with pytest.raises(InputError, match="int8 paths"):
        pyggml_resnet.load(int8_path, gemm="ggml")
    with pytest.raises(InputError, match="calibration"):
        convert.convert(pth, f32_path.parent / "x.gguf", dtype="int8", progress=False)
    with pytest.raises(InputError, match="calibration"):
        convert.convert(pth, f32_path.parent / "x.gguf", calibration=calibration_pictures(1), progress=False)
    assert not (f32_path.parent / "x.gguf").exists()


@pytest.mark.parametrize("depth", [18, 50])
def test_each_conv_reads_the_quantization_calibrated_for_its_input(model_files, depth):
    """The file holds, for each conv by name, what calibration measured for that conv's input (calibration
    meets a block's downsample before its main path, the file lists convs in `arch.convolutions` order):
    a stage's first conv and its downsample read one tensor, so they share one quantization, and the convs
    after them each their own; and for each downsample, what calibration measured for its output."""
    from pyggml_resnet import arch
    from pyggml_resnet.convert import calibrate
    from pyggml_resnet.loader import read
    _, _, f32_path = model_files(depth)
    _, _, int8_path = model_files(depth, dtype="int8")
    with pyggml_resnet.load(f32_path) as f32_model:
        measured = calibrate.quants(f32_model, calibration_pictures(), progress=False)
    stored = read(int8_path).input_quants
    assert stored == measured.inputs
    assert read(int8_path).shortcut_quants == measured.shortcuts
    assert len(measured.shortcuts) == len(arch.downsamples(f32_model.config)) == {18: 3, 50: 4}[depth]
    first = "layer2.0.conv1.weight"
    assert stored[first] == stored["layer2.0.downsample.0.weight"] != stored["layer2.0.conv2.weight"]


@pytest.mark.parametrize("rule", ["percentile", "mse"])
def test_convs_reading_one_tensor_share_its_quantization_under_every_rule(model_files, rule):
    """A stage's first conv and its downsample read one tensor: calibration measures it once, so they share
    its range under the sampling rules too (apart, their random samples would give two ranges)."""
    from pyggml_resnet import arch
    from pyggml_resnet.convert import calibrate
    _, _, f32_path = model_files(18)
    with pyggml_resnet.load(f32_path) as model:
        inputs, _ = model.calibration_taps(peers.images(peers.TEST, 1))
        quants = calibrate.quants(model, calibration_pictures(2), rule, progress=False).inputs
        downsampled = [(main[0], down) for main, down in (arch.block_convs(model.config, b)
                                                          for b in arch.block_names(model.config)) if down]
    assert len(downsampled) == 3
    for first, down in downsampled:
        assert inputs[first.name] is inputs[down.name]
        assert quants[first.name] == quants[down.name]
    assert list(quants) == list(inputs)  # graph order, every ungrouped conv


def test_convert_command_line_calibrates_from_a_directory(model_files, tmp_path, capsys):
    ref, pth, _ = model_files(18, 10)
    for i, picture in enumerate(calibration_pictures(3)):
        picture.save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out.gguf"
    assert convert.main([str(pth), str(out), "--dtype", "int8", "--calibration", str(tmp_path),
                         "--calibration-count", "2"]) == 0
    assert "int8" in capsys.readouterr().out
    with pyggml_resnet.load(out, threads=2) as model:
        assert model.dtype == "int8"
        x = peers.images(peers.TEST, 2)
        got = peers.agreement(model.logits(x), torch_logits(ref, x))
    assert got["rel_l2_error"] < 0.2, got


def test_resnext_int8_keeps_its_grouped_convs_f32(model_files):
    """ResNeXt's grouped 3x3 convs stay f32 (BatchNorm folded at conversion), every other conv runs int8."""
    ref, _, path = model_files(50, 10, dtype="int8", groups=32, width_per_group=4)
    x = peers.images(peers.TEST, 4)
    with pyggml_resnet.load(path, threads=2) as model:
        layouts = {m.conv.groups: m.layout.value for m in model._plan.matrices.values() if m.conv}
        assert layouts == {1: "int8", 32: "plain"}
        got = peers.agreement(model.logits(x), torch_logits(ref, x))
    assert 0 < got["rel_l2_error"] < 0.03 and got["top1_agreement"] == 1.0, got  # measured 0.020


def test_blocks_hand_their_output_on_as_u8(model_files):
    """Each block's output goes to the next block as u8 bytes, quantized as the next block's first conv
    quantizes its input: its last adds them as its residual, or (the first block of a stage) its downsample
    reads them, where that shares the first conv's input quantization (calibration measures their one input
    once). The net's last block hands on f32, for the pooling, and so does every block of an f32 model. The
    bytes are those each reader would make from f32: logits equal `stages`', whose stage outputs stay f32. The
    stem hands its output on as u8 the same way (a bottleneck net's), and the max pool pools its bytes."""
    import dataclasses

    from pyggml_resnet import arch, resnet
    from pyggml_resnet.arch import InputQuant
    _, _, int8_path = model_files(18, dtype="int8")
    _, _, f32_path = model_files(18)
    with pyggml_resnet.load(int8_path) as int8_model, pyggml_resnet.load(f32_path) as f32_model:
        cfg, plan = int8_model.config, int8_model._plan
        blocks = [arch.block_convs(cfg, b) for b in arch.block_names(cfg)]
        # The stem's output too, max-pooled as bytes (quantizing is monotonic, so the bytes are the same),
        # where layer1's first block has a downsample: ResNet-18 adds it as a residual, so it stays f32.
        assert resnet._u8_successor(plan, [arch.STEM], blocks[0]) == blocks[0][0][0]
        assert resnet._stem_successor(plan, cfg) is None
        with pyggml_resnet.load(model_files(50, dtype="int8")[2]) as bottleneck:
            first = arch.block_convs(bottleneck.config, next(arch.block_names(bottleneck.config)))[0][0]
            assert resnet._stem_successor(bottleneck._plan, bottleneck.config) == first
            x = peers.images(peers.TEST, 2)
            assert np.array_equal(bottleneck.logits(x), bottleneck.stages(x)["logits"])
        assert resnet._stem_successor(f32_model._plan, cfg) is None
        for k, (main, _) in enumerate(blocks):
            following = blocks[k + 1] if k + 1 < len(blocks) else None
            want = following[0][0] if following else None
            assert resnet._u8_successor(plan, main, following) == want
            assert resnet._u8_successor(f32_model._plan, main, following) is None
            if following and following[1]:  # a downsample quantizing apart from the first conv reads f32
                down = plan[following[1].name]
                other = InputQuant(down.input_quant.scale * 2, down.input_quant.zero)
                apart = dataclasses.replace(plan, matrices={**plan.matrices, down.name: dataclasses.replace(
                    down, input_quant=other)})
                assert resnet._u8_successor(apart, main, following) is None
        x = peers.images(peers.TEST, 2)
        assert np.array_equal(int8_model.logits(x), int8_model.stages(x)["logits"])


def test_downsamples_hand_their_output_on_as_u8(model_files, test_images):
    """Each downsample writes its output (the shortcut) as u8, quantized over the signed range calibration
    measured for it, and its block's last conv adds those bytes as its residual, as the peers' int8 models
    quantize every Add's inputs. A file without the shortcut ranges (converted before; test_loader reads one)
    keeps them f32, with an error of the same size."""
    from pyggml_resnet import arch, loader, resnet
    from pyggml_resnet.model import Model
    ref, _, int8_path = model_files(18, dtype="int8")
    _, _, f32_path = model_files(18)
    older = loader.read(int8_path)
    older.shortcut_quants = None
    want = torch_logits(ref, test_images)
    with pyggml_resnet.load(int8_path) as model, Model(older) as before, pyggml_resnet.load(f32_path) as f32_model:
        downsampled = [arch.block_convs(model.config, b) for b in arch.block_names(model.config)
                       if b.downsample]
        assert len(downsampled) == 3
        for main, down in downsampled:
            quant = model._plan[down.name].output_quant
            assert 0 < quant.zero < 255 and resnet._shortcut_quant(model._plan, main, down) == quant
            assert resnet._shortcut_quant(before._plan, main, down) is None
            assert resnet._shortcut_quant(f32_model._plan, main, down) is None
        got, got_before = model.logits(test_images), before.logits(test_images)
        assert np.array_equal(got[:2], model.stages(test_images[:2])["logits"])
    assert not np.array_equal(got, got_before)
    errors = [peers.agreement(y, want)["rel_l2_error"] for y in (got, got_before)]
    assert max(errors) <= REL_L2_BOUND[18] and errors[0] <= 1.15 * errors[1], errors
