"""Every example a reader would copy from README.md and docs/*.md, run: so a renamed option or function fails here.

The runner reads each document's examples in order:
- ```python blocks run in one namespace per document (later blocks build on earlier ones);
- shell commands run in bash: `$ `-prefixed lines in ``` / ```sh / ```console blocks, and 4-space-indented
  blocks that start with a command (`pyggml-resnet`, `python`, `pip`, ...).
They run in a scratch folder where the names the documents use (resnet101.gguf, photo.jpg, photos/, a
Lightning .ckpt, a timm directory, the pretrained cache) are small stand-ins: a seeded ResNet-18 with 10
classes at 64/56-pixel preprocessing, and the cache filled so that `--model resnet101` loads without the network.

A block the tests cannot run here (it installs packages, needs the internet, a long-running server or Ray) is
preceded by a visible `<!-- not run: why -->`; the runner counts those, prints them, and still checks them: a
Python block must compile, and each `pyggml-resnet` / `python -m pyggml_resnet.convert` command in it must parse
with that command's own argument parser. Output blocks (the text shown after a command) are not compared: they
come from real or seeded weights at full size, which the stand-ins are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyggml_resnet import arch, bench, convert, hub

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
COMMAND = re.compile(r"^(pyggml-resnet|python3?|pip|curl|huggingface-cli|\.venv[\w-]*/bin/\S+|ray|git)(\s|$)")
SHELL_LANGS = {"", "sh", "console", "bash", "shell"}
NUM_CLASSES = 10
SMALL = arch.Preprocessing(resize=64, crop=56)


@dataclasses.dataclass
class Example:
    doc: str
    line: int
    kind: str  # "python" or "shell"
    text: str  # the code, or the commands one per line (continuations joined)
    not_run: str | None  # why, from the marker before the block

    def __str__(self):
        return f"{self.doc}:{self.line}"


def _commands(lines: list[str]) -> list[str]:
    """Shell lines with backslash continuations joined."""
    out, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append((pending + line).strip())
            pending = ""
    return [c for c in out if c]


def _fenced(lang: str, body: list[str]) -> tuple[str, str] | None:
    if lang == "python":
        return "python", "\n".join(body)
    if lang in SHELL_LANGS:
        # Commands are the `$ ` lines and their continuations; every other line is output.
        cmds, cont = [], False
        for line in body:
            if line.startswith("$ ") or cont:
                cmds.append(line[2:] if line.startswith("$ ") else line)
                cont = line.rstrip().endswith("\\")
        if cmds:
            return "shell", "\n".join(_commands(cmds))
    return None  # output, a diagram, a CSV: nothing to run


def examples(path: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    doc = str(path.relative_to(ROOT))
    found, marker, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        if m := NOT_RUN.search(line):
            marker = m.group(1)
        if m := FENCE.match(line):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            block = _fenced(m.group(1), lines[i + 1:end])
            if block:
                found.append(Example(doc, i + 1, *block, marker))
            marker = None  # a marker holds for the block right after it
            i = end + 1
            continue
        indented = line.startswith("    ") and not line.startswith("     ") and (i == 0 or not lines[i - 1].strip())
        if indented and COMMAND.match(line[4:]):
            end = i
            while end < len(lines) and lines[end].startswith("    "):
                end += 1
            found.append(Example(doc, i + 1, "shell", "\n".join(_commands([x[4:] for x in lines[i:end]])), marker))
            marker, i = None, end
            continue
        i += 1
    return found


ALL = [e for d in DOCUMENTS for e in examples(d)]


# --- the stand-ins ---------------------------------------------------------------------------------------

def _image(path: Path, seed: int, size=(80, 100)):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)


def _scene(root: Path):
    y, x = np.mgrid[0:90, 0:120]
    img = np.stack([x * 2, y * 2, 255 - x], -1).astype(np.uint8)
    img[30:60, 40:80] = (220, 30, 30)
    Image.fromarray(img).save(root / "scene.png")
    Image.fromarray(img[:, ::-1]).save(root / "scene_mirrored.png")
    Image.fromarray((img * 0.6).astype(np.uint8)).save(root / "scene_dark.jpg")
    _image(root / "noise.png", 7, (90, 120))


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("doc-examples")
    state = bench.random_state(arch.BY_NAME["resnet18"], NUM_CLASSES)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    for name in ("resnet101.pth", "resnet101-cd907fc2.pth", "resnet18-seeded.pth"):
        torch.save(tensors, root / name)
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in tensors.items()},
                               "head_loss.weight": torch.ones(3)}}, root / "classifier.ckpt")
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(NUM_CLASSES)))
    timm = root / "resnet50.a1_in1k"
    timm.mkdir()
    save_file = pytest.importorskip("safetensors.numpy").save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(timm / "model.safetensors"))
    (timm / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": NUM_CLASSES,
                                                  "pretrained_cfg": {"tag": "a1_in1k", "input_size": [3, 56, 56],
                                                                     "crop_pct": 0.875}}))
    checkpoint = convert.Checkpoint.of(state)
    gguf = root / "resnet101.gguf"
    convert.write_gguf(checkpoint, gguf, progress=False, preprocessing=SMALL)
    for name in ("resnet50.gguf", "resnet18-seeded.gguf", "old.gguf"):
        os.link(gguf, root / name)
    (root / "cache").mkdir()
    for name in ("resnet101", "resnet50", "resnet18"):  # what --model NAME and from_pretrained(NAME) find
        os.link(gguf, hub.cached_path(name, cache_dir=root / "cache"))
    for i, name in enumerate(("photo.jpg", "dog.jpg")):
        _image(root / name, i)
    (root / "photos").mkdir()
    for i, name in enumerate(("flipped.png", "gradient.jpg", "sub/beach.jpg")):
        (root / "photos" / name).parent.mkdir(exist_ok=True)
        _image(root / "photos" / name, 10 + i)
    (root / "calibration").mkdir()  # images like the training set's, for int8 calibration
    for i in range(4):
        _image(root / "calibration" / f"{i}.jpg", 20 + i)
    (root / "photos" / "empty.png").write_bytes(b"")
    (root / "photos" / "notes.jpg").write_text("not an image\n")
    _scene(root)
    return root


@pytest.fixture
def workdir(stand_ins, tmp_path, monkeypatch):
    """A fresh copy of the stand-ins per document (hard links: every command writes its output atomically,
    replacing a link, never writing through it)."""
    work = tmp_path / "work"
    shutil.copytree(stand_ins, work, copy_function=os.link)
    monkeypatch.chdir(work)
    monkeypatch.setenv(hub.ENV_CACHE, str(work / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return work


# --- checking what is not run ---------------------------------------------------------------------------

def _parser_check(command: str) -> None:
    """A project command in a block that is not run: its options must still exist."""
    from pyggml_resnet import cli
    from pyggml_resnet.bench import run as bench_run
    from pyggml_resnet.convert import cli as convert_cli
    from pyggml_resnet.serve import cli as serve_cli

    argv = shlex.split(command, comments=True)
    if argv[:1] == ["pyggml-resnet"]:
        argv = argv[1:]
    elif argv[:3] == ["python", "-m", "pyggml_resnet.convert"]:
        argv = ["convert", *argv[3:]]
    else:
        return  # not ours: pip, curl, ...
    parse = {"convert": lambda a: convert_cli._parse_args(a, "convert"), "bench": bench_run.parse_args,
             "serve": lambda a: serve_cli.build_parser().parse_args(a)}.get(argv[0])
    if parse:
        parse(argv[1:])
    else:
        cli.build_parser().parse_args(argv)


def test_every_document_has_examples_and_the_markers_are_few():
    by_doc = {str(d.relative_to(ROOT)): [e for e in ALL if e.doc == str(d.relative_to(ROOT))] for d in DOCUMENTS}
    assert sum(1 for e in ALL if e.not_run is None) >= 15, [str(e) for e in ALL]
    skipped = [e for e in ALL if e.not_run]
    print(f"\n{len(ALL)} examples, {len(skipped)} not run:")
    for e in skipped:
        print(f"  {e}: {e.not_run}")
    assert all(e.not_run.strip() for e in skipped)  # each says why
    assert by_doc["README.md"] and by_doc["docs/usage.md"]


@pytest.mark.parametrize("example", [e for e in ALL if e.not_run], ids=str)
def test_examples_not_run_still_parse(example):
    if example.kind == "python":
        compile(example.text, str(example), "exec")
        return
    for command in example.text.splitlines():
        try:
            _parser_check(command)
        except SystemExit as e:
            raise AssertionError(f"{example}: `{command}` does not parse (exit {e.code})") from None


# --- running ---------------------------------------------------------------------------------------------

def _run_shell(example: Example, work: Path) -> None:
    for command in example.text.splitlines():
        assert COMMAND.match(command) and command.split()[0] in ("pyggml-resnet", "python", "python3"), (
            f"{example}: `{command}` is not a command the runner can run here; "
            "precede its block with <!-- not run: why -->")
        proc = subprocess.run(["bash", "-c", command], cwd=work, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{example}: `{command}` exited {proc.returncode}\n{proc.stderr[-2000:]}"


def _run_python(example: Example, namespace: dict, work: Path, monkeypatch) -> None:
    # A block written as a script (gguf.md's dump) reads sys.argv: give it a model file.
    monkeypatch.setattr(sys, "argv", [example.doc, str(work / "resnet18-seeded.gguf")])
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(compile(example.text, str(example), "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{example}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("doc", [d for d in DOCUMENTS if any(not e.not_run for e in examples(d))],
                         ids=lambda d: d.name)
def test_document_examples_run(doc, workdir, monkeypatch):
    namespace = {"__name__": "__doc_example__"}
    ran = 0
    for example in examples(doc):
        if example.not_run:
            continue
        if example.kind == "python":
            _run_python(example, namespace, workdir, monkeypatch)
        else:
            _run_shell(example, workdir)
        ran += 1
    assert ran
