"""The one writer (`pyggml_resnet.atomic`): a file appears whole, in the umask's mode, or not at all, whatever
stops the write (an exception, Ctrl-C, SIGTERM, a full or read-only disk), and an older file is kept.

Full and read-only disks are real ones: a 1 MiB tmpfs mounted for the test (the tests run as root in CI;
elsewhere they are skipped, saying why).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pyggml_resnet import atomic, convert, results
from pyggml_resnet.errors import InputError


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def umask():
    """Sets the umask for the test, and restores it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_mode_is_the_umasks(tmp_path, umask, mask):
    umask(mask)
    with atomic.replacing(tmp_path / "out.bin") as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o600  # mkstemp's, private while it is written
        tmp.write_bytes(b"data")
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o666 & ~mask
    assert listing(tmp_path) == ["out.bin"]
    # Result files get it too.
    results.write([{"path": np.array(["a.jpg"], dtype=object), "error": np.array([None], dtype=object)}],
                  tmp_path / "r.csv")
    assert stat.S_IMODE((tmp_path / "r.csv").stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failed_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path, exc):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic.replacing(out) as tmp:
            tmp.write_bytes(b"new, partial")
            raise exc
    assert out.read_bytes() == b"old" and listing(tmp_path) == ["out.bin"]


def test_scratch_is_deleted_on_success_too(tmp_path):
    with atomic.scratch(tmp_path, "download.pth") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".download.pth.") and tmp.name.endswith(".part")
        tmp.write_bytes(b"x")
    assert listing(tmp_path) == []


def test_sigterm_handler_only_while_writing():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with atomic.scratch(Path.cwd(), "x"):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_programs_own_sigterm_handler_is_kept(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with atomic.replacing(tmp_path / "out") as tmp:
            assert signal.getsignal(signal.SIGTERM) is mine
            tmp.write_bytes(b"x")
    finally:
        signal.signal(signal.SIGTERM, previous)


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pyggml_resnet import atomic
    with atomic.replacing(sys.argv[1]) as tmp, open(tmp, "wb") as f:
        for i in range(600):
            f.write(b"x" * 4096)
            f.flush()
            if i == 0:
                print("writing", flush=True)
            time.sleep(0.1)
""")


def test_sigterm_during_a_long_write_leaves_neither_output_nor_temporary(tmp_path):
    out = tmp_path / "out.bin"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    assert len(listing(tmp_path)) == 1  # the temporary file, being written
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended
    assert listing(tmp_path) == []


def test_sigterm_during_classify_out(model_files, tmp_path):
    """An interrupted `classify --out` (as a scheduler stops it) leaves no output and no temporary file."""
    from PIL import Image

    _, _, model = model_files(18, 10)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(200):
        Image.new("RGB", (64, 48), (i, 10, 30)).save(images / f"{i:03d}.png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "pyggml_resnet", "classify", str(images), "--model", str(model),
                             "--threads", "1", "--out", str(out_dir / "r.csv")], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not listing(out_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listing(out_dir) and listing(out_dir)[0].startswith(".r.csv.")  # writing: 200 images take a while
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert listing(out_dir) == []


def test_full_disk_names_the_output_and_keeps_the_old_file(small_disk):
    out = small_disk / "old"
    with pytest.raises(OSError) as info:
        with atomic.replacing(out) as tmp, open(tmp, "wb") as f:
            f.write(b"x" * (2 << 20))
    assert info.value.errno == errno.ENOSPC
    assert str(out) in str(info.value) and ".part" not in str(info.value), str(info.value)
    assert out.read_bytes() == b"yesterday's file" and listing(small_disk) == ["old"]


def test_full_disk_while_converting(small_disk, model_files):
    _, pth, _ = model_files(18, 10)  # 45 MB of f32: far more than the disk holds
    with pytest.raises(OSError) as info:
        convert.convert(pth, small_disk / "old", progress=False, force=True)
    # NumPy's short write carries no errno: the message says what it means, and where.
    assert str(info.value).startswith(f"{small_disk / 'old'}: a write was cut short")
    assert "is the disk full?" in str(info.value) and ".part" not in str(info.value), str(info.value)
    assert (small_disk / "old").read_bytes() == b"yesterday's file" and listing(small_disk) == ["old"]


def test_read_only_directory_names_the_output_and_keeps_the_old_file(small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "old"
    with pytest.raises(OSError) as info:
        with atomic.replacing(out):
            pytest.fail("the temporary file cannot have been made")
    assert info.value.errno == errno.EROFS and info.value.filename == str(out)
    assert str(info.value) == (f"[Errno {errno.EROFS}] Read-only file system (nothing written; any previous file "
                               f"is kept): '{out}'")
    assert out.read_bytes() == b"yesterday's file"
    # The command lines print it as their one error line.
    rows = [{"path": np.array(["a.jpg"], dtype=object), "error": np.array(["unreadable"], dtype=object)}]
    with pytest.raises(OSError, match="Read-only file system"):
        results.write(rows, small_disk / "r.csv")


def test_other_errors_keep_their_own_file_name(tmp_path):
    """Only the disk's refusal of the output is renamed; a missing input inside the block stays as it is."""
    with pytest.raises(FileNotFoundError) as info:
        with atomic.replacing(tmp_path / "out"):
            open(tmp_path / "missing-input")
    assert info.value.filename == str(tmp_path / "missing-input")


def test_check_target(tmp_path):
    assert atomic.check_target(tmp_path / "a.csv") == tmp_path / "a.csv"
    with pytest.raises(InputError, match=f"^output {tmp_path} is a directory$"):
        atomic.check_target(tmp_path)
    with pytest.raises(InputError, match=f"^--out {tmp_path}/no/a.csv: its directory {tmp_path}/no does not exist$"):
        atomic.check_target(tmp_path / "no" / "a.csv", "--out")
    assert listing(tmp_path) == []
