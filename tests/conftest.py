"""Shared fixtures: seeded reference ResNets and their converted GGUF files, made once per test session; a
small disk to fill."""

import subprocess

import pytest
import torch

from pyggml_resnet import convert

from reference_resnet import make_model


CALIBRATION_IMAGES = 8  # int8 files: the bench's synthetic calibration pictures, none of them a test image


def calibration_pictures(count: int = CALIBRATION_IMAGES):
    """The int8 files' calibration images: the ONNX Runtime int8 peer's (bench/peers.py), as PIL pictures
    drawn at the size `peers.images` draws them for the default preprocessing."""
    from pyggml_resnet.bench import peers

    return peers.pictures(peers.CALIBRATION, count, 256 * 5 // 4)


class ModelFiles:
    """Builds (reference torch model, .pth path, .gguf path) per (depth, num_classes, groups, width), once;
    an "int8" file is calibrated on `calibration_pictures()`."""

    def __init__(self, root):
        self.root = root
        self.cache = {}

    def __call__(self, depth: int, num_classes: int = 1000, dtype: str = "f32", *, groups: int = 1,
                 width_per_group: int = 64):
        key = depth, num_classes, groups, width_per_group
        stem = f"resnet{depth}-{num_classes}" + ("" if key[2:] == (1, 64) else f"-{groups}x{width_per_group}")
        if key not in self.cache:  # the model and its checkpoint serve every dtype
            ref = make_model(depth, seed=depth, num_classes=num_classes, groups=groups,
                             width_per_group=width_per_group)
            pth = self.root / f"{stem}.pth"
            torch.save(ref.state_dict(), pth)
            self.cache[key] = (ref, pth)
        ref, pth = self.cache[key]
        gguf_path = self.root / f"{stem}-{dtype}.gguf"
        if not gguf_path.exists():
            calibration = {"calibration": calibration_pictures()} if dtype == "int8" else {}
            convert.convert(pth, gguf_path, dtype=dtype, progress=False, **calibration)
        return ref, pth, gguf_path


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    return ModelFiles(tmp_path_factory.mktemp("models"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, with a file `old` on it; unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {p.stderr.strip()}")
    try:
        (mnt / "old").write_bytes(b"yesterday's file")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def drop_big_files(tmp_path):
    """For tests that write model files of 22 to 180 MB, and pytest keeps the last three runs' temporary
    directories: delete what takes real disk space once each test is done (sparse files take none)."""
    yield
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.stat().st_blocks * 512 > 1 << 20:
            p.unlink()
