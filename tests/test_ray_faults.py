"""`classify DIR --ray --out x.parquet` on a two-node cluster (`ray.cluster_utils.Cluster`: two raylets of one
CPU on this machine) that loses a worker process or a whole node midway: every image still has exactly one
row, equal to a one-process run's, and a file that kills the decoder's process becomes an error row after a
bounded number of deaths (pyggml_resnet.ray: `_CrashJournal`, ACTOR_RESTARTS).

The faults are injected by a Predictor subclass that the CLI runs in place of its own (the driver's code below
swaps `pyggml_resnet.ray.predict`'s class; cloudpickle sends the subclass to the actors by value): nothing in
the package knows about them. The poisoned file is a good image on which the subclass's decoder reads address 0
(a real SIGSEGV in the decoding thread, as a crashing native decoder's; `os.kill` would signal the process,
and another of Ray's threads could take the signal while decoding went on).
"""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pyggml_resnet import ray as pr

pytestmark = pytest.mark.filterwarnings(r"ignore::DeprecationWarning:ray(\.|$)")

IMAGES = 40  # 10 batches of 4: enough for both actors to do work before and after a fault
BATCH = 4
POISON = "poison.png"

DRIVER = r'''
import ctypes, os, sys, time
from pathlib import Path
import ray
from pyggml_resnet import cli, ray as pr

LOG, STALL_NODE, POISON = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


class Faulty(pr.Predictor):
    """Kills its process when it decodes POISON; on STALL_NODE, stalls in its second batch (until the test
    removes the node under it), and elsewhere takes half a second longer per batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from pyggml_resnet import transforms

        decode = transforms.preprocess

        def poisoned(img, **options):
            if POISON and str(img).endswith(POISON):
                (LOG / f"crash-{os.getpid()}").touch()
                ctypes.string_at(0)  # a real segmentation fault, in this thread, as a native decoder's
            return decode(img, **options)

        transforms.preprocess = poisoned
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if STALL_NODE and ray.get_runtime_context().get_node_id() == STALL_NODE:
            if self.calls == 2:
                (LOG / "stalled").write_text(str(batch["path"][0]))
                time.sleep(600)
        elif STALL_NODE:
            # Ray Data gives a batch to an idle actor on the node that holds its data first: on a fast CPU the
            # head's actor is always idle again in time and the worker's would get no second batch.
            time.sleep(0.5)
        return super().__call__(batch)


predict = pr.predict
pr.predict = lambda ds, model, **options: predict(ds, model, cls=Faulty, **options)
# Batches only once both actors are up, so that the worker node's actor has batches to lose.
ray.data.DataContext.get_current().wait_for_min_actors_s = 120
sys.exit(cli.main(sys.argv[4:]))
'''


@pytest.fixture(scope="module")
def model_path(model_files):
    return str(model_files(18)[2])  # a seeded resnet18 with ImageNet's 1000 labels, as tests/test_ray.py's


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-images")
    rng = np.random.default_rng(25)
    for i in range(IMAGES - 1):
        Image.fromarray((rng.random((40 + i, 60 - i, 3)) * 255).astype(np.uint8)).save(root / f"{i:02d}.jpg")
    Image.fromarray((rng.random((50, 50, 3)) * 255).astype(np.uint8)).save(root / POISON)  # a good image
    return root


@pytest.fixture(scope="module")
def one_process(folder, model_path, tmp_path_factory):
    """The rows of `classify --features` in this process, unpatched: the results every Ray run must equal."""
    out = tmp_path_factory.mktemp("one-process") / "features.parquet"
    proc = subprocess.run([sys.executable, "-m", "pyggml_resnet", "classify", str(folder), "--model", model_path,
                           "--features", "--threads", "1", "--batch-size", str(BATCH), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == IMAGES and all(r["error"] is None for r in rows)
    return rows


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node of one CPU and a 100 MiB object store each. The test that removes the worker
    runs last."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # another module's local Ray, if one is still connected in this process
    node = {"num_cpus": 1, "object_store_memory": 100 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.worker = cluster.add_node(**node)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def classify_on_ray(cluster, folder, model_path, log, out, *, stall_node="", poison=""):
    """`classify --ray --features --out` with the Faulty predictor, in a driver process of its own."""
    args = [log, stall_node, poison, "classify", folder, "--model", model_path, "--features",
            "--batch-size", BATCH, "--ray", cluster.address, "--out", out]
    return subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the job did not finish in {timeout} s: {proc.communicate()[1][-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def test_a_file_that_kills_its_worker_becomes_an_error_row(cluster, folder, model_path, one_process, tmp_path):
    """The poisoned file kills its actor's process twice (the batch's first attempt, then its watched retry);
    the third attempt makes it an error row and computes the rest of its batch. No other row changes."""
    out = tmp_path / "x.parquet"
    start = time.monotonic()
    stderr = finish(classify_on_ray(cluster, folder, model_path, tmp_path, out, poison=POISON))
    rows = pq.read_table(out).to_pylist()
    assert [r["path"] for r in rows] == [r["path"] for r in one_process]  # each once, in order
    poisoned = str(folder / POISON)
    assert "1 unreadable file(s)" in stderr
    for row, want in zip(rows, one_process):
        if row["path"] == poisoned:
            assert row["features"] is None
            assert row["error"] == f"{poisoned}: its worker process died while decoding this file (a crash in " \
                                   "the decoder?); not decoded again"
        else:
            assert row == want  # bit for bit: the model's results do not depend on the batch's other images
    assert len(list(tmp_path.glob("crash-*"))) == 2  # two deaths, then the error row: no endless retry
    print(f"poisoned run: {time.monotonic() - start:.1f} s")


def test_losing_a_node_midway_loses_no_image(cluster, folder, model_path, one_process, tmp_path):
    """The worker node is removed (its raylet and processes killed) while its actor holds a batch, after it
    has delivered one: the batch is run again on the head node, and the output equals the one-process run."""
    out = tmp_path / "x.parquet"
    proc = classify_on_ray(cluster, folder, model_path, tmp_path, out, stall_node=cluster.worker.node_id)
    stalled = tmp_path / "stalled"

    def remove_worker_node():
        deadline = time.monotonic() + 240
        while not stalled.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        if stalled.exists():
            cluster.remove_node(cluster.worker, allow_graceful=False)

    killer = threading.Thread(target=remove_worker_node)
    killer.start()
    try:
        finish(proc)
    finally:
        killer.join()
    assert stalled.exists(), "the worker node's actor never took a second batch"
    lost = stalled.read_text()
    rows = pq.read_table(out).to_pylist()
    assert rows == one_process  # every image exactly once, in order, every bit equal
    assert lost in [r["path"] for r in rows]
    assert not list(tmp_path.glob("crash-*"))
