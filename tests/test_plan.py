"""The plan of each convolution and the fc layer (pyggml_resnet.plan): which layout, path, stored type and
shape, and Winograd rule each matrix of ResNet-18/50/101 and a ResNeXt gets under each set of options, and the
requests a model refuses. Expected values are counted from the architecture here, not asked of the plan."""

import math

import pytest

from pyggml_resnet import arch, cpu
from pyggml_resnet import plan as plan_module
from pyggml_resnet.arch import Conv
from pyggml_resnet.errors import InputError
from pyggml_resnet.ggml import Type, gemm_path_supported
from pyggml_resnet.packing import GEMM_PATHS
from pyggml_resnet.plan import GEMM_CHOICES, Layout, Winograd, gemm_paths, matrix_plan, packed_paths, plan_model

NETS = ("resnet18", "resnet50", "resnet101", "resnext50_32x4d")
# Ungrouped 3x3 stride-1 convs (Winograd's): every 3x3 but the first of stages 2-4 (stride 2); none in a
# ResNeXt, whose 3x3 convs are grouped. Basic blocks have two 3x3 convs, bottlenecks one.
WINOGRAD_CONVS = {"resnet18": 8 * 2 - 3, "resnet50": 16 - 3, "resnet101": 33 - 3, "resnext50_32x4d": 0}
F32_PATH = gemm_paths()[0] if gemm_paths() else None
BF16_PATH = gemm_paths("bf16")[0] if gemm_paths("bf16") else None


def plan(name, dtype="f32", gemm=None, winograd=None, batchnorm="folded", classes=10):
    return plan_model(arch.BY_NAME[name], classes, dtype=Type.parse(dtype), gemm=gemm, winograd=winograd,
                      batchnorm=batchnorm)


def is_winograd_conv(conv: Conv) -> bool:
    return (conv.kernel, conv.stride, conv.groups) == (3, 1, 1)


@pytest.mark.parametrize("name", NETS)
def test_ggml_mul_mat_plans_plain_matrices(name):
    """gemm="ggml": every matrix plain, stored [OC, K] with K padded to 32 above 1x1; nothing runs Winograd."""
    p = plan(name, gemm="ggml")
    assert p.gemm == "ggml" and p.weight_type == Type.F32 and p.batchnorm == "folded"
    convs = [m for m in p.matrices.values() if m.conv]
    assert [m.name for m in convs] == [c.name for c in arch.convolutions(arch.BY_NAME[name])]
    for m in p.matrices.values():
        assert (m.layout, m.path, m.weight_type, m.winograd) == (Layout.PLAIN, None, Type.F32, Winograd.NEVER)
    assert p["conv1.weight"].stored_shape == (64, 160)  # 7 * 7 * 3 = 147, padded
    assert p.fc.shape == p.fc.stored_shape == (10, arch.BY_NAME[name].feature_dim) and p.fc.conv is None


@pytest.mark.parametrize("name", NETS)
def test_ggml_winograd_stores_transformed_weights_for_3x3_stride_1_convs(name):
    p = plan(name, gemm="ggml", winograd=True)
    wino = [m for m in p.matrices.values() if m.layout is Layout.WINOGRAD]
    assert len(wino) == WINOGRAD_CONVS[name]
    for m in p.matrices.values():
        if m.conv and is_winograd_conv(m.conv):
            assert m.winograd is Winograd.ALWAYS and m.stored_shape == (16, m.conv.out_ch, m.conv.in_ch)
        else:
            assert (m.layout, m.winograd) == (Layout.PLAIN, Winograd.NEVER)


@pytest.mark.skipif(F32_PATH is None, reason="no f32 packed GEMM path on this CPU")
@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("winograd, rule", [(None, Winograd.LARGE_IMAGES), (True, Winograd.ALWAYS),
                                            (False, Winograd.NEVER)])
def test_packed_plans(name, winograd, rule):
    """The default for f32: every ungrouped conv and the fc packed on the CPU's widest path (grouped convs
    stay on mul_mat); its 3x3 stride-1 convs run Winograd from the packed weights by `winograd`'s rule."""
    for gemm in (None, "packed", F32_PATH):
        p = plan(name, gemm=gemm, winograd=winograd)
        assert p.gemm == F32_PATH
        for m in p.matrices.values():
            if m.conv and m.conv.groups > 1:
                assert (m.layout, m.path, m.winograd) == (Layout.PLAIN, None, Winograd.NEVER)
                continue
            assert (m.layout, m.path, m.weight_type) == (Layout.PACKED, F32_PATH, Type.F32)
            assert m.winograd is (rule if m.conv and is_winograd_conv(m.conv) else Winograd.NEVER)
            oc, k = m.shape[0], m.stored_shape[1]
            assert m.stored_shape == (-(-oc // 32) * 2, k, 16) and k == math.prod(m.shape[1:])


@pytest.mark.skipif(BF16_PATH is None, reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bf16_packs_on_its_own_path_without_winograd(name):
    p = plan(name, dtype="bf16", gemm=BF16_PATH, winograd=True)
    assert p.gemm == BF16_PATH and p.compute_type == Type.BF16
    for m in p.matrices.values():
        assert m.weight_type == Type.BF16 and m.winograd is Winograd.NEVER and m.layout is Layout.PACKED
    assert p["conv1.weight"].stored_shape == (4, 148, 16)  # K = 147 padded to whole pairs


@pytest.mark.skipif(F32_PATH is None, reason="no f32 packed GEMM path on this CPU")
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("winograd", [None, True, False])
def test_widened_weights_are_planned_as_f32_weights(dtype, winograd):
    """f16 and bf16 weights on an f32 path: the model keeps its dtype, computes in f32, and every matrix has
    the plan an f32 model's has, Winograd included."""
    for path in gemm_paths():
        p, f32 = plan("resnet50", dtype=dtype, gemm=path, winograd=winograd), plan("resnet50", gemm=path,
                                                                                   winograd=winograd)
        assert (p.weight_type, p.compute_type, p.gemm) == (Type.parse(dtype), Type.F32, path)
        assert p.matrices == f32.matrices and f32.compute_type == Type.F32


def rule(monkeypatch, vendor: str, avx512bf16: bool) -> None:
    """This CPU as another: its vendor, and whether it has AVX512-BF16 (its f32 paths as this one's)."""
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    supported = plan_module.gemm_path_supported
    monkeypatch.setattr(plan_module, "gemm_path_supported",
                        lambda path: avx512bf16 if path == "avx512bf16" else supported(path))


@pytest.mark.skipif(F32_PATH is None, reason="no f32 packed GEMM path on this CPU")
@pytest.mark.parametrize("vendor, avx512bf16, native", [
    ("AuthenticAMD", True, True),  # Zen 4: vdpbf16ps beats its FMAs
    ("GenuineIntel", True, False),  # issue 22's Xeon: vdpbf16ps slower than its FMAs
    ("AuthenticAMD", False, False), ("GenuineIntel", False, False),  # no bf16 dot product at all
    (None, True, False), ("HygonGenuine", True, False),  # a vendor not known fast: f32, which never loses
])
def test_bf16_runs_its_own_path_only_where_the_cpu_makes_it_faster(monkeypatch, vendor, avx512bf16, native):
    """The default (and "packed") for bf16 weights: AVX512-BF16's path on CPUs whose bf16 dot product beats their
    f32 FMAs, else the f32 path over the weights widened at load; either may still be named. f16 has no path of
    its own: always widened."""
    rule(monkeypatch, vendor, avx512bf16)
    f32_paths = gemm_paths()
    want = ("avx512bf16", *f32_paths) if native else (*f32_paths, *(("avx512bf16",) if avx512bf16 else ()))
    assert packed_paths("bf16") == want and packed_paths("f16") == f32_paths == packed_paths("f32")
    assert packed_paths("q8_0") == ()
    for gemm in (None, "packed"):
        p = plan("resnet18", dtype="bf16", gemm=gemm)
        assert (p.gemm, p.compute_type) == (("avx512bf16", Type.BF16) if native else (F32_PATH, Type.F32))
        assert (plan("resnet18", dtype="f16", gemm=gemm).gemm, plan("resnet18", gemm=gemm).gemm) == (F32_PATH,) * 2
    if avx512bf16:
        assert plan("resnet18", dtype="bf16", gemm="avx512bf16").compute_type == Type.BF16
    else:
        with pytest.raises(InputError, match="cannot run the packed GEMM's avx512bf16 path for bf16 weights"):
            plan("resnet18", dtype="bf16", gemm="avx512bf16")
    for dtype in ("bf16", "f16"):
        ggml = plan("resnet18", dtype=dtype, gemm="ggml")
        assert (ggml.gemm, ggml.compute_type, ggml.fc.weight_type) == ("ggml", Type.parse(dtype), Type.parse(dtype))


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_stay_plain_on_ggml(dtype):
    """q8_0 always takes ggml's mul_mat; f16 where asked (gemm="ggml"), or where the CPU has no packed path."""
    p = plan("resnet50", dtype=dtype, gemm="ggml" if dtype == "f16" else None, winograd=True)
    assert p.gemm == "ggml" and p.compute_type == Type.parse(dtype)
    assert all((m.layout, m.weight_type) == (Layout.PLAIN, Type.parse(dtype)) for m in p.matrices.values())


def test_a_row_that_does_not_fill_q8_0_blocks_is_stored_f32():
    conv = Conv("w", "bn", 48, 64, 1, 1, 0)  # K = 48: one and a half blocks of 32
    assert matrix_plan("w", conv.shape, Type.Q8_0, None, None, conv).weight_type == Type.F32
    conv = Conv("w", "bn", 48, 64, 3, 1, 1)  # K = 432, padded to 448 for the plain layout: whole blocks
    assert matrix_plan("w", conv.shape, Type.Q8_0, None, None, conv).weight_type == Type.Q8_0


def test_winograd_rule_by_image_size():
    """LARGE_IMAGES: 32 or more 2x2 output tiles (ResNet's layers 1-3 at 224x224, not layer4's 7x7), whatever
    the batch; ALWAYS and NEVER whatever the size."""
    large = Winograd.LARGE_IMAGES
    assert large.runs(14, 14) and large.runs(8, 15) and large.runs(56, 56)  # 49, 4 x 8 and 784 tiles
    assert not large.runs(7, 7) and not large.runs(1, 1) and not large.runs(8, 13)  # 16, 1 and 28 tiles
    assert Winograd.ALWAYS.runs(1, 1) and not Winograd.NEVER.runs(224, 224)


def test_packed_winograd_only_for_3x3_stride_1_f32():
    if F32_PATH is None:
        pytest.skip("no f32 packed GEMM path on this CPU")
    for conv in (Conv("w", "bn", 64, 64, 3, 2, 1), Conv("w", "bn", 64, 64, 1, 1, 0)):
        m = matrix_plan("w", conv.shape, Type.F32, F32_PATH, True, conv)
        assert (m.layout, m.winograd) == (Layout.PACKED, Winograd.NEVER)


def test_impossible_requests_are_refused():
    with pytest.raises(InputError, match="gemm must be one of"):
        plan("resnet18", gemm="blas")
    for gemm in ("packed", *GEMM_PATHS):
        with pytest.raises(InputError, match="f16 and bf16 widened to f32: use gemm='ggml' for q8_0 weights"):
            plan("resnet18", dtype="q8_0", gemm=gemm)
    for dtype in ("f32", "f16"):  # rounding either to bf16 would not be exact: only f32 paths widen
        with pytest.raises(InputError, match=f"cannot run the packed GEMM's avx512bf16 path for {dtype} weights"):
            plan("resnet18", dtype=dtype, gemm="avx512bf16")
    if F32_PATH is None:
        for dtype in ("f32", "f16", "bf16"):
            with pytest.raises(InputError, match=f"no packed GEMM path for {dtype} weights .it needs AVX2 and FMA"):
                plan("resnet18", dtype=dtype, gemm="packed")
    with pytest.raises(InputError, match="cannot run the packed GEMM's int8-avx2 path for f32 weights"):
        plan("resnet18", gemm="int8-avx2")  # int8 paths are for int8 files only
    assert GEMM_CHOICES == ("packed", "ggml", "avx512", "avx2", "avx512bf16", "int8-avx512vnni", "int8-avxvnni",
                            "int8-avx2", "int8-scalar")


def test_the_cpu_query_knows_only_the_packed_paths():
    assert set(gemm_paths()) | set(gemm_paths("bf16")) <= set(GEMM_CHOICES[2:])
    assert all(gemm_path_supported(p) for p in gemm_paths() + gemm_paths("bf16"))
    for bad in ("sse", "packed", None, ["avx2"]):
        with pytest.raises(InputError, match="no path"):
            gemm_path_supported(bad)
