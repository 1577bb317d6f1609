"""pyggml_resnet.ray on a real local Ray (two 1-CPU actors), on a simulated two-node cluster, and the CLI's
--ray / --features outputs. Every Ray result is compared with one process's Model on the same batches:
ggml's matrix products may round differently for another batch size (by ~1e-6), so each reference batch is
exactly the batch an actor computed, recorded by a wrapper around Predictor.

One Ray session serves the whole module (starting one takes seconds); the cluster test runs last and brings
its own.
"""

import copy
import csv
import json
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

import pyggml_resnet
from pyggml_resnet import ray as pr

# Ray 2.60 warns about its own settings (DataContext's use_push_based_shuffle): not ours to fix, and it must
# not fail a run that turns warnings into errors.
pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray(\.|$)")

GOOD = 13  # with the 2 bad files, 15 rows: batches of 4 leave a remainder
BAD = {"empty.png": "empty file", "truncated.jpg": "truncated"}
BATCH = 4


@pytest.fixture(scope="module")
def model_path(model_files):
    return str(model_files(18)[2])  # a seeded resnet18 with ImageNet's 1000 labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """GOOD readable images of several sizes and modes (16-bit included), and the BAD files."""
    root = tmp_path_factory.mktemp("ray-images")
    rng = np.random.default_rng(14)
    for i in range(GOOD - 3):
        rgb = (rng.random((40 + 9 * i, 90 - 3 * i, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / f"rgb{i:02d}.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    Image.fromarray((rng.random((50, 70)) * 65535).astype(np.uint16)).save(root / "deep16.png")
    (root / "empty.png").write_bytes(b"")
    jpeg = (root / "rgb00.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


@pytest.fixture(scope="module")
def model(model_path):
    with pyggml_resnet.load(model_path, threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def recording():
    """Predictor that also records, per row, its batch (first path), actor, node and thread count. Defined
    in a function so that cloudpickle sends it by value: Ray's workers cannot import this test module."""

    class Recording(pr.Predictor):
        def __call__(self, batch):
            out = super().__call__(batch)
            n, context = len(out["path"]), ray.get_runtime_context()
            out["batch"] = np.array([out["path"][0]] * n, dtype=object)
            out["actor"] = np.array([context.get_actor_id()] * n, dtype=object)
            out["node"] = np.array([context.get_node_id()] * n, dtype=object)
            out["threads"] = np.full(n, self.model.threads)
            return out

    return Recording


def run(folder, model_path, output):
    """The pipeline as a user writes it, with Recording for Predictor: rows keyed by path. Ray Data is told to
    hand out batches only once both actors are up: otherwise, on a loaded machine, the first one ready can take
    every batch before the second has started, and "both actors (nodes) did work" would fail by chance."""
    ray.data.DataContext.get_current().wait_for_min_actors_s = 120
    ds = pr.predict(pr.read_paths([folder], batch_size=BATCH), model_path, cls=recording(), output=output,
                    actors=2, threads=1, batch_size=BATCH)
    return {row["path"]: row for row in ds.take_all()}


def check_against_one_process(rows, model, folder, output):
    """Every file has one row; bad files an error; good ones exactly the one-process result on the same batch."""
    assert sorted(rows) == sorted(str(p) for p in folder.iterdir())
    for name, words in BAD.items():
        row = rows[str(folder / name)]
        assert words in row["error"] and name in row["error"]
        assert (len(row["labels"]) == 0 if output == "classify" else np.isnan(row[output]).all())
    batches = {}
    for path, row in sorted(rows.items()):
        if row["error"] is None:
            batches.setdefault(row["batch"], []).append(path)
    assert sum(map(len, batches.values())) == GOOD
    for paths in batches.values():
        if output == "classify":
            for path, predictions in zip(paths, model.classify(paths, top_k=5)):
                row = rows[path]
                assert list(row["labels"]) == [p.label for p in predictions]
                assert list(row["indices"]) == [p.index for p in predictions]
                assert list(row["probs"]) == [round(p.prob, 6) for p in predictions]
        else:
            x = np.stack([model.preprocess(p) for p in paths])
            want = model.features(x) if output == "features" else model.logits(x)
            np.testing.assert_array_equal(np.stack([rows[p][output] for p in paths]), want)
    return batches


@pytest.mark.parametrize("output", ["classify", "logits", "features"])
def test_two_actors_match_one_process(local_ray, folder, model_path, model, output):
    rows = run(folder, model_path, output)
    batches = check_against_one_process(rows, model, folder, output)
    sizes = sorted({len([r for r in rows.values() if r["batch"] == b]) for b in batches})
    assert BATCH in sizes and min(sizes) < BATCH  # full batches and at least one remainder
    assert len({r["actor"] for r in rows.values()}) == 2  # both actors did work
    assert {int(r["threads"]) for r in rows.values()} == {1}  # a 1-CPU actor computes with 1 thread


def test_read_paths_gives_blocks_of_one_batch(local_ray, tmp_path):
    """Ray Data cuts a task's last batch at the end of its blocks: from_items' blocks of 2 rows (for 300 rows)
    would give tasks of 16 + 2 rows; read_paths' blocks are whole batches, in the paths' order."""
    for i in range(300):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"")  # only listed, never read here
    ds = pr.read_paths([tmp_path], batch_size=16)
    blocks = [list(b["path"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert [len(b) for b in blocks] == [16] * 18 + [12]
    assert sum(blocks, []) == [str(tmp_path / f"{i:03d}.jpg") for i in range(300)]
    with pytest.raises(pyggml_resnet.InputError, match="batch_size"):
        pr.read_paths([tmp_path], batch_size=0)


@pytest.mark.parametrize("cpus, threads", [(0.5, 1), (1, 1), (2, 2)])
def test_threads_follow_the_actors_cpus(local_ray, model_path, cpus, threads):
    @ray.remote(num_cpus=cpus)
    def predictor_threads(path):
        return pr.Predictor(path).model.threads

    assert ray.get(predictor_threads.remote(model_path)) == threads


def test_image_column_gives_the_tensors_of_paths(local_ray, folder, model):
    """read_images(mode="RGB") then preprocess equals preprocess(path), except for 16-bit images (Pillow's
    convert clips them), which is why paths are the preferred input."""
    good = sorted(str(p) for p in folder.iterdir() if p.name not in BAD)
    rows = ray.data.read_images(good, mode="RGB", include_paths=True).take_all()
    assert len(rows) == GOOD
    for row in rows:
        path = row["path"]
        same = np.array_equal(model.preprocess(row["image"]), model.preprocess(path))
        assert same == (not path.endswith("deep16.png")), path
    # and the Predictor reads the image column when there is one
    images = np.empty(4, dtype=object)  # a column of differently shaped images, as Ray passes them
    for i, image in enumerate([r["image"] for r in rows[:3]] + [np.zeros((0, 5, 3), np.uint8)]):
        images[i] = image
    batch = {"image": images, "path": np.array([r["path"] for r in rows[:3]] + ["nothing.png"], dtype=object)}
    predictor = pr.Predictor(model.path, output="logits", threads=1)
    out = predictor(batch)
    np.testing.assert_array_equal(out["logits"][:3], model.logits(np.stack([model.preprocess(r["image"])
                                                                           for r in rows[:3]])))
    assert out["error"][:3].tolist() == [None] * 3 and "nothing.png: image array" in out["error"][3]


def test_a_model_never_travels(local_ray, model, model_path):
    for attempt in (lambda: pickle.dumps(model), lambda: copy.deepcopy(model), lambda: ray.put(model),
                    lambda: pr.Predictor(model), lambda: pr.map_batches_kwargs(model)):
        with pytest.raises(TypeError, match="path"):
            attempt()
    kwargs = pr.map_batches_kwargs(model_path)
    assert kwargs["num_cpus"] == 1 and kwargs["batch_format"] == "numpy"
    # bounded restarts and retries (tests/test_ray_faults.py), never Ray Data's default of -1: forever
    assert kwargs["max_restarts"] == pr.ACTOR_RESTARTS == 8 and kwargs["max_task_retries"] == -1
    assert kwargs["compute"].min_size == kwargs["compute"].max_size == 2  # the local Ray's 2 CPUs
    assert kwargs["compute"].max_tasks_in_flight_per_actor == 1  # a death costs no queued batch a retry
    assert kwargs["fn_constructor_kwargs"]["model"] == model_path


def test_a_crashed_actor_fails_the_job_fast(local_ray, folder, model_path, tmp_path):
    """A native crash (abort(), as GGML_ABORT does) in every batch must fail the job, not restart actors
    forever: the first batch is run 1 + ACTOR_RESTARTS times (each in a restarted actor), then the job fails
    with the actor's death."""
    attempts = tmp_path / "attempts"
    attempts.mkdir()

    class Crashing(pr.Predictor):
        def __call__(self, batch):
            (attempts / str(os.getpid())).touch()  # one file per attempt: each in a new process
            os.abort()

    ds = pr.predict(pr.read_paths([folder]), model_path, cls=Crashing, actors=1)
    outcome = []

    def job():
        try:
            ds.materialize()
            outcome.append("finished")
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert outcome, "still running after 120 s: the crashed actor was restarted?"
    assert isinstance(outcome[0], ray.exceptions.ActorDiedError), outcome
    assert len(list(attempts.iterdir())) == 1 + pr.ACTOR_RESTARTS


def test_crash_journal_blames_a_file_only_on_a_live_node(local_ray):
    """A retry that died while decoding row 2 blames that file when its node is alive (the file crashed the
    worker), not when the node is gone (a lost node: the file may be good)."""
    here = ray.get_runtime_context().get_node_id()
    for node, blamed in ((here, [2]), ("ff" * 28, [])):
        journal = pr._CrashJournal()  # the actor's class, called in this process
        assert journal.begin("batch", node) == (1, [])  # the first attempt
        assert journal.begin("batch", node) == (2, [])  # it died before a watched attempt, blaming nothing
        journal.decoding("batch", 1)
        journal.decoding("batch", 2)  # ... and the retry died here
        assert journal.begin("batch", here) == (3, blamed)
        journal.decoding("batch", None)  # decoding done: a death now is the batch's
        assert journal.begin("batch", here) == (4, blamed)
        journal.done("batch")
        assert journal.begin("batch", here) == (1, [])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pyggml_resnet", "classify", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_ray_parquet(local_ray, folder, model_path, model, tmp_path):
    """--ray ADDRESS joins a running cluster (here the module's), writes every row, keeps the paths' order."""
    out = tmp_path / "results.parquet"
    address = ray.get_runtime_context().gcs_address
    proc = cli(folder, "--model", model_path, "--ray", address, "--actors", "2", "--out", out, "--top-k", 3)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {GOOD + len(BAD)} rows to {out}; 2 unreadable file(s)" in proc.stderr
    table = pq.read_table(out)
    assert table.column_names == ["path", "labels", "indices", "probs", "error"]
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == sorted(str(p) for p in folder.iterdir())
    for row in rows:
        if os.path.basename(row["path"]) in BAD:
            assert row["labels"] is None and BAD[os.path.basename(row["path"])] in row["error"]
            continue
        want = model.classify(row["path"], top_k=3)  # batch 1 here: equal to 6 decimals, not bit for bit
        assert row["labels"] == [p.label for p in want] and row["error"] is None
        np.testing.assert_allclose(row["probs"], [p.prob for p in want], rtol=0, atol=2e-6)


def test_cli_ray_failed_write_exits_promptly(local_ray, folder, model_path, tmp_path):
    """A write that fails midway under --ray ends with the error line and exit code 1, in seconds: Ray Data's
    iterator is closed before Ray shuts down, and no partial file is left. (Left open, held by the traceback,
    it went on after ray.shutdown() and started a new local Ray behind the error line.)"""
    out = tmp_path / "results.parquet"
    address = ray.get_runtime_context().gcs_address
    code = ("import sys; from pyggml_resnet import cli, results\n"
            "def full(batch): raise OSError(28, 'No space left on device')\n"
            "results._arrow_table = full\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "classify", str(folder), "--model", model_path,
                           "--ray", address, "--actors", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == ("error: [Errno 28] No space left on device (nothing written; any "
                                            f"previous file is kept): '{out}'"), proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_cli_features_without_ray(folder, model_path, model, tmp_path, suffix):
    """--features without --ray runs the same Predictor in-process and never imports Ray."""
    out = tmp_path / f"features{suffix}"
    code = ("import sys; from pyggml_resnet import cli; rc = cli.main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'imported ray'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "classify", str(folder), "--model", model_path,
                           "--features", "--threads", "1", "--batch-size", str(BATCH), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if suffix == ".parquet":
        rows = pq.read_table(out).to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "features", "error"]
        for r in rows:
            r["features"] = [float(v) for v in r["features"].split("|")] if r["features"] else None
    paths = sorted(str(p) for p in folder.iterdir())
    assert [r["path"] for r in rows] == paths
    good = [p for p in paths if os.path.basename(p) not in BAD]
    got = {r["path"]: r["features"] for r in rows}
    assert all(got[p] is None for p in paths if p not in good)
    # the in-process batches are the paths in order, 4 at a time, bad files left out of their batch
    for start in range(0, len(paths), BATCH):
        chunk = [p for p in paths[start:start + BATCH] if p in good]
        want = model.features(np.stack([model.preprocess(p) for p in chunk]))
        np.testing.assert_array_equal(np.array([got[p] for p in chunk], np.float32), want)


def test_classify_without_ray_does_not_import_it(folder, model_path):
    code = ("import sys; from pyggml_resnet import cli; rc = cli.main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow'))); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "classify", str(folder / "gray.png"), "--model",
                           model_path, "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_two_node_cluster(folder, model_path, model):
    """Two raylets on this machine stand in for two nodes of one CPU each: one actor runs on each."""
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's local Ray, if a test above started it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        rows = run(folder, model_path, "features")
        check_against_one_process(rows, model, folder, "features")
        nodes = {r["node"] for r in rows.values()}
        assert len(nodes) == 2 and nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
