"""What the README and docs promise about the code, checked against the code."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyggml_resnet
from pyggml_resnet import arch, bench, convert

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_layout_table_lists_every_module():
    listed = set(re.findall(r"^\| `(pyggml_resnet/[^`]+)` \|", README, re.M))
    package = ROOT / "pyggml_resnet"
    modules = {f"pyggml_resnet/{p.name}" for p in package.glob("*.py") if not p.name.startswith("__")}
    modules |= {f"pyggml_resnet/{p.parent.name}/" for p in package.glob("*/__init__.py")}
    assert listed == modules
    # A package's row names each of its modules.
    for init in package.glob("*/__init__.py"):
        row = re.search(rf"^\| `pyggml_resnet/{init.parent.name}/` \|(.*)$", README, re.M).group(1)
        missing = [p.name for p in init.parent.glob("*.py") if not p.name.startswith("__") and f"`{p.name}`" not in row]
        assert not missing, (init.parent.name, missing)


def test_extras_pin_the_readmes_torch():
    """`pip install '.[convert]'` must not resolve torch to a multi-GB CUDA build the README warns about."""
    tomllib = pytest.importorskip("tomllib")
    pins = set(re.findall(r"pip install (torch==[\w.+]+)", README))
    assert len(pins) == 1, pins
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("convert", "test"):
        assert [r for r in extras[name] if r.startswith("torch")] == list(pins), name


def test_model_preprocess_follows_the_file_and_the_module_level_one_does_not(tmp_path):
    """What the README says: the module-level preprocess has torchvision's classic defaults, so for weights
    recorded with resize 232 (torchvision's V2) it differs from model.preprocess, unless given the settings."""
    cfg = arch.BY_NAME["resnet18"]
    path = tmp_path / "v2.gguf"
    convert.write_gguf(convert.Checkpoint.of(bench.random_state(cfg, 10)), path, progress=False,
                       preprocessing=arch.Preprocessing(resize=232, crop=224))
    img = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    with pyggml_resnet.load(path, threads=1) as model:
        ours = model.preprocess(img)
        assert not np.array_equal(ours, pyggml_resnet.preprocess(img))
        assert np.array_equal(ours, pyggml_resnet.preprocess(img, **dataclasses.asdict(model.preprocessing)))
        probs = model.probabilities(ours[None])[0]  # what classify computes
        [top] = model.classify(img, top_k=1)
        assert top.index == int(np.argmax(probs)) and top.prob == float(probs[top.index])


def test_source_folder_without_the_extension_says_what_to_do(tmp_path):
    """The README's note: after a non-editable install, `import pyggml_resnet` from the repository's root finds
    the source folder, which has no compiled `_ggml`: one ImportError line naming the fix, not a bare
    ModuleNotFoundError. (-S keeps site-packages, and so an editable install's redirect, out of the child.)"""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "pyggml_resnet", tmp_path / "pyggml_resnet",
                    ignore=shutil.ignore_patterns("_ggml*", "__pycache__"))
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'pyggml-resnet'\n")
    for code in ("import pyggml_resnet", "import pyggml_resnet.convert"):
        proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1
        assert last.startswith("ImportError: pyggml_resnet was imported from its source folder "), last
        assert "run from another directory, or install in place with `pip install -e .`" in last
    # Outside a source tree (a broken install), it says to reinstall.
    (tmp_path / "pyproject.toml").unlink()
    proc = subprocess.run([sys.executable, "-S", "-c", "import pyggml_resnet"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert "compiled extension (_ggml) is missing" in proc.stderr and "reinstall" in proc.stderr


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_documents_resolve():
    """Every relative link `[..](doc.md#anchor)` or `[..](#anchor)` in README.md and docs/ names a file that
    exists and a heading it has, so moving or renaming a section fails here."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", text):
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target}")
                continue
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)
            if anchor and anchor not in {_slug(h) for h in headings}:
                broken.append(f"{doc.name}: {target}#{anchor}")
    assert not broken, broken
