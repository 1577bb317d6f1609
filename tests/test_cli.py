"""The command line: `pyggml-resnet classify` on files and folders, its output formats and its errors.

Most runs call `pyggml_resnet.cli.main` in-process; a few run `python -m pyggml_resnet` and the installed
`pyggml-resnet` script, to check the real process (exit codes, one-line errors, same output). Every
result is compared with `Model.classify` on the same files. Runs use one thread: the test machine may be
shared, and ggml's worker threads spin.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyggml_resnet
from pyggml_resnet import cli, hub
from pyggml_resnet import results as results_module

LINE = re.compile(r"^  top\[(\d+)\]=(\d\.\d{6}) index = (\d+) label = (.+)$")
READABLE = ["a.jpg", "b.png", "deep16.png", "gray.png", "palette.gif", "rgba.png", "sub/c.jpeg"]
UNREADABLE = ["empty.png", "fake.jpg", "truncated.jpg"]
PROB_TOL = 2e-6  # printed with 6 decimals; batches of different sizes differ by ~1e-9


@pytest.fixture(scope="module")
def model_path(model_files):
    return str(model_files(18)[2])  # a seeded resnet18 with 1000 ImageNet labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images of every kind the CLI meets in a real folder, and three files that are not images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "a.jpg", quality=90)
    Image.fromarray(rgb[::-1]).save(root / "b.png")
    Image.fromarray(rgb[..., 1]).save(root / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.fromarray((rng.random((50, 70)) * 65535).astype(np.uint16)).save(root / "deep16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    (root / "sub").mkdir()
    Image.fromarray(rgb[:, ::-1].copy()).save(root / "sub" / "c.jpeg")
    (root / "notes.txt").write_text("no image suffix: not even looked at")
    (root / "fake.jpg").write_text("a text file with an image suffix")
    (root / "empty.png").write_bytes(b"")
    jpeg = (root / "a.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    assert Image.open(root / "deep16.png").mode.startswith("I")  # really 16-bit
    assert Image.open(root / "palette.gif").mode == "P"
    return root


@pytest.fixture(scope="module")
def expected(model_path, folder):
    """{path: top-5 Predictions} from Model.classify, for every readable file."""
    with pyggml_resnet.load(model_path, threads=1) as model:
        paths = [str(folder / name) for name in READABLE]
        return dict(zip(paths, model.classify(paths, top_k=5)))


def run_main(capsys, *args):
    rc = cli.main(["classify", *map(str, args), "--threads", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(command, *args, env=None):
    return subprocess.run([*command, "classify", *map(str, args), "--threads", "1"], capture_output=True,
                          text=True, timeout=300, env=env)


def parse_text(out: str) -> dict[str, list[tuple[str, int, float]]]:
    """The text format: a path line, then one `  top[i]=P index = N label = NAME` line per class."""
    results, current = {}, None
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            assert int(m.group(1)) == len(results[current])
            results[current].append((m.group(4), int(m.group(3)), float(m.group(2))))
        else:
            current = line
            results[current] = []
    return results


def assert_matches(got: dict, expected: dict, top_k: int = 5):
    assert sorted(got) == sorted(expected)
    for path, rows in got.items():
        want = expected[path][:top_k]
        assert [(r[0], r[1]) for r in rows] == [(p.label, p.index) for p in want], path
        np.testing.assert_allclose([r[2] for r in rows], [p.prob for p in want], rtol=0, atol=PROB_TOL)


def read_csv(path) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "labels", "indices", "probs", "error"]
    return {r[0]: list(zip(r[1].split("|"), map(int, r[2].split("|")), map(float, r[3].split("|"))))
            for r in rows[1:] if not r[4]}  # the good rows


def read_jsonl(path) -> dict:
    results = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["error"] is None:  # the good rows
            results[row["path"]] = list(zip(row["labels"], row["indices"], row["probs"]))
    return results


# -- one file ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_text_output(capsys, model_path, folder, expected, top_k):
    image = str(folder / "a.jpg")
    rc, out, err = run_main(capsys, image, "--model", model_path, *(["--top-k", top_k] if top_k else []))
    assert rc == 0 and err == ""
    got = parse_text(out)
    assert list(got) == [image] and len(got[image]) == (top_k or 5)
    assert_matches(got, {image: expected[image]}, top_k or 5)


def test_json_output(capsys, model_path, folder, expected):
    images = [str(folder / "b.png"), str(folder / "sub" / "c.jpeg")]
    rc, out, err = run_main(capsys, *images, "--model", model_path, "--json", "--top-k", 2)
    assert rc == 0 and err == ""
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == images and all(set(r) == {"path", "labels", "indices", "probs"}
                                                       for r in rows)
    assert_matches({r["path"]: list(zip(r["labels"], r["indices"], r["probs"])) for r in rows},
                   {p: expected[p] for p in images}, 2)


def test_verbose_prints_stage_shapes(capsys, model_path, folder):
    rc, out, _ = run_main(capsys, folder / "a.jpg", "--model", model_path, "--verbose", "--top-k", 1)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("<Model resnet18 f32")
    assert lines[1:10] == [  # ggml order: W x H x C x N
        "model.input     shape:  224 x  224 x    3 x   1",
        "model.maxpool   shape:   56 x   56 x   64 x   1",
        "model.layer1    shape:   56 x   56 x   64 x   1",
        "model.layer2    shape:   28 x   28 x  128 x   1",
        "model.layer3    shape:   14 x   14 x  256 x   1",
        "model.layer4    shape:    7 x    7 x  512 x   1",
        "model.avgpool   shape:  512 x    1 x    1 x   1",
        "model.fc        shape: 1000 x    1 x    1 x   1",
        str(folder / "a.jpg"),
    ]
    assert LINE.match(lines[10]) and len(lines) == 11


# -- folders -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_folder_to_file(capsys, model_path, folder, expected, tmp_path, suffix):
    results = tmp_path / f"results{suffix}"
    rc, out, err = run_main(capsys, folder, "--model", model_path, "--out", results)
    assert rc == 0 and out == ""
    got = read_csv(results) if suffix == ".csv" else read_jsonl(results)
    assert_matches(got, expected)  # one good row per readable image, sub/ included, notes.txt not looked at
    # Each unreadable file is a row naming it in its error column (as --ray and --features write them).
    if suffix == ".csv":
        with open(results, newline="", encoding="utf-8") as f:
            bad = [r for r in csv.DictReader(f) if r["error"]]
        assert all(r["labels"] == r["indices"] == r["probs"] == "" for r in bad)
    else:
        bad = [r for r in map(json.loads, results.read_text(encoding="utf-8").splitlines()) if r["error"]]
        assert all(r["labels"] is r["indices"] is r["probs"] is None for r in bad)
    assert sorted(Path(r["path"]).name for r in bad) == UNREADABLE
    assert all(r["error"].startswith(f"{r['path']}: ") for r in bad)
    assert f"wrote 10 rows to {results}; 3 unreadable file(s), see the error column" in err
    assert "skipped" not in err


def test_batch_size_does_not_change_results(capsys, model_path, folder, tmp_path):
    default, small = tmp_path / "default.jsonl", tmp_path / "small.jsonl"
    assert run_main(capsys, folder, "--model", model_path, "--out", default)[0] == 0
    assert run_main(capsys, folder, "--model", model_path, "--out", small, "--batch-size", 2)[0] == 0
    a, b = read_jsonl(default), read_jsonl(small)
    assert list(a) == list(b)  # same rows in the same order
    for path in a:
        assert [r[:2] for r in a[path]] == [r[:2] for r in b[path]]
        np.testing.assert_allclose([r[2] for r in a[path]], [r[2] for r in b[path]], rtol=0, atol=PROB_TOL)


def test_nothing_readable(capsys, model_path, folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in UNREADABLE:
        shutil.copy(folder / name, bad / name)
    rc, out, err = run_main(capsys, bad, "--model", model_path)
    assert rc == 1 and out == ""
    assert err.count("skipped: ") == 3 and "error: none of the 3 image file(s) could be read" in err
    rc, _, err = run_main(capsys, tmp_path / "no-images-here", "--model", model_path)  # a missing file
    assert rc == 1 and "no such file" in err
    (tmp_path / "empty-dir").mkdir()
    rc, _, err = run_main(capsys, tmp_path / "empty-dir", "--model", model_path)
    assert rc == 1 and err == "error: no images found\n"


def test_bad_top_k(capsys, model_path, folder):
    rc, out, err = run_main(capsys, folder / "a.jpg", "--model", model_path, "--top-k", 1001)
    assert rc == 1 and out == "" and err == "error: --top-k 1001 is more than the model's 1000 classes\n"
    with pytest.raises(SystemExit) as info:
        run_main(capsys, folder / "a.jpg", "--model", model_path, "--top-k", 0)
    assert info.value.code == 2


# -- real processes ----------------------------------------------------------------------------------------


def test_module_and_console_script_agree(capsys, model_path, folder):
    args = (folder / "a.jpg", folder / "gray.png", "--model", model_path, "--top-k", 3)
    module = run_process([sys.executable, "-m", "pyggml_resnet"], *args)
    assert module.returncode == 0 and module.stderr == ""
    rc, out, _ = run_main(capsys, *args)
    assert rc == 0 and module.stdout == out
    script = shutil.which("pyggml-resnet", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the pyggml-resnet console script is not installed beside this python")
    installed = run_process([script], *args)
    assert (installed.returncode, installed.stdout, installed.stderr) == (0, module.stdout, "")


@pytest.mark.parametrize("model", ["/nonexistent/dir/model.gguf", "missing.gguf", "vgg16"])
def test_bad_model_is_one_line_error(folder, model):
    result = run_process([sys.executable, "-m", "pyggml_resnet"], folder / "a.jpg", "--model", model)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert (model if model != "vgg16" else "unknown pretrained model 'vgg16'") in result.stderr


def test_pretrained_name_uses_the_cache(capsys, model_path, folder, expected, tmp_path, monkeypatch):
    """--model resnet18 goes through hub.from_pretrained; with the GGUF already cached, no network."""
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path))
    cached = hub.cached_path("resnet18")
    shutil.copy(model_path, cached)
    monkeypatch.setattr(hub, "_download", lambda *a, **k: pytest.fail("no download expected"))
    image = str(folder / "a.jpg")
    rc, out, err = run_main(capsys, image, "--model", "resnet18")
    assert rc == 0 and err == ""
    assert_matches(parse_text(out), {image: expected[image]})


# -- options checked before any work, and the options added for what only Python could do -------------------


@pytest.mark.parametrize("args, message", [
    (["--out", "results.json"], "--out results.json: the suffix picks the format, .parquet, .csv, .jsonl"),
    (["--out", "results"], "--out results: the suffix picks the format, .parquet, .csv, .jsonl"),
    (["--json", "--out", "r.csv"], "--json prints to stdout and --out writes a file: give one of them "
                                   "(--out FILE.jsonl writes JSON lines)"),
    (["--out", "."], "--out .: the suffix picks the format, .parquet, .csv, .jsonl"),
    (["--out", "dir.csv"], "--out dir.csv is a directory"),
    (["--out", "no/r.csv"], "--out no/r.csv: its directory no does not exist"),
])
def test_out_and_json_conflicts_refused_before_any_work(capsys, folder, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir.csv").mkdir()
    # The model does not exist either: the options are refused before it is opened.
    rc, out, err = run_main(capsys, folder / "a.jpg", "--model", tmp_path / "missing.gguf", *args)
    assert (rc, out, err) == (1, "", f"error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.csv"]


def test_out_is_written_whole_or_not_at_all(capsys, model_path, folder, tmp_path, monkeypatch):
    """An interrupted run leaves the file the user named as it was, and no partial file beside it."""
    from pyggml_resnet import model as model_module

    results = tmp_path / "results.csv"
    results.write_text("yesterday's results\n")
    calls = []

    def interrupted(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, x)

    real = model_module.Model.probabilities
    monkeypatch.setattr(model_module.Model, "probabilities", interrupted)
    rc, out, _ = run_main(capsys, folder, "--model", model_path, "--out", results)
    assert (rc, out, len(calls)) == (130, "", 3)
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]
    assert results.read_text() == "yesterday's results\n"


def test_parquet_in_process(capsys, model_path, folder, tmp_path, expected, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    results = tmp_path / "results.parquet"
    rc, _, err = run_main(capsys, folder, "--model", model_path, "--out", results, "--top-k", 2)
    assert rc == 0 and f"wrote 10 rows to {results}; 3 unreadable file(s)" in err
    rows = pq.read_table(results).to_pylist()
    assert_matches({r["path"]: list(zip(r["labels"], r["indices"], r["probs"])) for r in rows if not r["error"]},
                   expected, 2)
    # Without pyarrow: a clear error before any work, and no file.
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "pyarrow" else find_spec(name))
    rc, out, err = run_main(capsys, folder, "--model", model_path, "--out", tmp_path / "other.parquet")
    assert (rc, out) == (1, "") and err == ("error: writing Parquet needs pyarrow: pip install pyarrow "
                                            "(or 'pyggml-resnet[ray]')\n")
    assert not (tmp_path / "other.parquet").exists()


def test_out_suffix_any_case(capsys, model_path, folder, tmp_path, expected):
    results = tmp_path / "R.JSONL"
    assert run_main(capsys, folder / "a.jpg", "--model", model_path, "--out", results)[0] == 0
    assert_matches(read_jsonl(results), {str(folder / "a.jpg"): expected[str(folder / "a.jpg")]})


def test_max_pixels(capsys, model_path, folder, tmp_path, monkeypatch):
    """Pillow's decompression-bomb limit, which only Python could raise before."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 40x40 image is then "too large"
    image = tmp_path / "big.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(image)
    rc, out, err = run_main(capsys, image, "--model", model_path, "--top-k", 1)
    assert rc == 1 and out == ""
    assert err.startswith(f"skipped: {image}: image too large, refused as a possible decompression bomb")
    assert "(pyggml-resnet classify --max-pixels N)" in err
    rc, out, err = run_main(capsys, image, "--model", model_path, "--top-k", 1, "--max-pixels", 1600)
    assert rc == 0 and err == "" and out.splitlines()[0] == str(image) and LINE.match(out.splitlines()[1])
    assert Image.MAX_IMAGE_PIXELS == 1000  # the process-wide limit is restored
    with pytest.raises(SystemExit) as info:
        run_main(capsys, image, "--model", model_path, "--max-pixels", 0)
    assert info.value.code == 2 and "--max-pixels: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--version"], ["classify", "--version"]])
def test_version(capsys, args):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert out == f"pyggml-resnet {pyggml_resnet.__version__} (ggml {pyggml_resnet.ggml.version()})\n"
    assert re.fullmatch(r"pyggml-resnet \d+\.\d+\.\d+ \(ggml \d+\.\d+\.\d+\)\n", out)


@pytest.mark.parametrize("batch, states", [(None, list(range(11))), (4, [0, 4, 8, 10])])
def test_progress_bar_moves_per_image(capsys, model_path, folder, tmp_path, batch, states):
    """--out's bar is redrawn after every batch, and a batch is one image unless --batch-size says more."""
    args = ["--batch-size", batch] if batch else []
    rc, _, err = run_main(capsys, folder, "--model", model_path, "--out", tmp_path / "r.csv", *args)
    assert rc == 0
    seen = [int(m) for m in re.findall(r"\| *(\d+)/10 \[", err)]
    assert sorted(set(seen)) == states


@pytest.mark.parametrize("extra,want", [([], 1), (["--ray"], 16), (["--ray", "--batch-size", "3"], 3)])
def test_batch_size_default_depends_on_ray(monkeypatch, capsys, model_path, folder, tmp_path, extra, want):
    """One image per pass in this process (the bar moves per image); 16 with --ray, where a batch is a task."""
    import pyggml_resnet.ray as pray

    seen = []
    monkeypatch.setattr(pray, "run_cli", lambda args, paths: seen.append(args.batch_size) or 0)
    monkeypatch.setattr(results_module, "write_results",
                        lambda batches, out, total: seen.append(len(next(batches)["path"])) or 0)
    out = tmp_path / "r.csv"
    assert run_main(capsys, folder, "--model", model_path, "--out", out, *extra)[0] == 0
    assert seen == [want]


# --- the errors a new user meets first (issue 24): each names the file and what to do ----------------------


def test_first_errors_name_the_file_and_the_fix(capsys, model_files, folder, tmp_path):
    """A missing --model file, a checkpoint given as --model, a missing checkpoint and a text file given as one:
    one `error:` line each, naming the file and the fix, never a bare [Errno 2] or KeyError."""
    image = folder / "a.jpg"
    rc, out, err = run_main(capsys, image, "--model", tmp_path / "missing.gguf")
    assert (rc, out) == (1, "")
    assert err == (f"error: --model {tmp_path / 'missing.gguf'}: no such file; give a .gguf model file (convert a "
                   "checkpoint with pyggml-resnet convert CHECKPOINT MODEL.gguf) or a pretrained name such as "
                   "resnet50\n")
    pth = model_files(18)[1]  # the seeded resnet18's .pth
    rc, _, err = run_main(capsys, image, "--model", pth)
    assert rc == 1 and err.startswith(f"error: {pth}: not a GGUF file (it starts with b'PK")
    assert err.endswith("a checkpoint (.pth, .ckpt, .safetensors) runs once converted: pyggml-resnet convert "
                        "CHECKPOINT MODEL.gguf\n")
    missing = tmp_path / "r18.pth"
    assert cli.main(["convert", str(missing), str(tmp_path / "out.gguf")]) == 1
    assert capsys.readouterr().err == (f"error: {missing}: no such file or directory; give the checkpoint to "
                                       "convert (a .pth, .ckpt, .safetensors or .gguf file, or a timm model "
                                       "directory)\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("epochs: 10\nlr: 0.1\n")
    assert cli.main(["convert", str(notes), str(tmp_path / "out.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {notes} is not a weights-only PyTorch checkpoint, nor another format the "
                          "converter reads (it starts with b'epochs: ': not a zip or a pickle). Give the file "
                          "torch.save(model.state_dict(), PATH) wrote"), err
    assert "KeyError" not in err and "Errno" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_help_says_what_top_k_does_and_usage_follows_the_invocation(capsys):
    with pytest.raises(SystemExit):
        cli.main(["classify", "--help"])
    assert re.search(r"--top-k K +print \(or write\) the K most probable classes", capsys.readouterr().out)
    for argv, prog in ((["convert", "--help"], "pyggml-resnet convert"), (["bench", "--help"], "pyggml-resnet bench")):
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert capsys.readouterr().out.startswith(f"usage: {prog} "), argv
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet.convert", "--help"], capture_output=True, text=True)
    assert proc.stdout.startswith("usage: python -m pyggml_resnet.convert ")
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet.bench", "--help"], capture_output=True, text=True)
    assert proc.stdout.startswith("usage: python -m pyggml_resnet.bench ")
