"""Shared fixtures: synthetic MNIST-like IDX files, a local HTTP mirror, the real
mirror from MNIST_MIRROR, and a throw-away copy of the project for CLI tests."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

from pipeline import process

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]


TINY_FIXTURES = {"tiny_repo", "tiny_experiment"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the shared tiny repository last, the longest of them (marked
    `first`) first among them: the test processes run the others first, the first to
    need the repository builds it while the others still have work, and the longest
    does not start last and end the run alone (pytest-xdist hands out this order)."""

    def order(item: pytest.Item) -> int:
        if not TINY_FIXTURES & set(getattr(item, "fixturenames", ())):
            return 0
        return 1 if item.get_closest_marker("first") else 2

    items.sort(key=order)


def pytest_configure(config: pytest.Config) -> None:
    """In each of several test processes (pytest-xdist) torch takes one thread, and so do
    the processes the tests start: two processes with two threads each would fight over
    two cores (OpenMP threads spin while they wait) and run slower than one."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def committed_params_text() -> str:
    """params.yaml as committed: `dvc exp run -S ...` leaves the workspace's copy holding
    the experiment's values, which are not the project's defaults."""
    shown = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    return shown.stdout if shown.returncode == 0 else (ROOT / "params.yaml").read_text()


PROJECT_FILES = ["src", "params.yaml", "dvc.yaml", ".gitignore", ".dvcignore"]

# A run small enough for a 2-core CPU in seconds: everything but the sizes as in params.yaml,
# and a checkpoint after each epoch (by default every 10 minutes: none in a run of seconds),
# so that these runs write and remove checkpoints, and can be stopped between them.
TINY = {
    "preprocess": {"val_size": 100, "train_limit": 400, "test_limit": 200},
    "model": {"width": 4},
    "train": {
        "epochs": 2,
        "batch_size": 50,
        "device": "cpu",
        "eval_batch_size": 256,
        "checkpoint_every": 1,
    },
    "evaluate": {"device": "cpu"},
    "plot": {"max_misclassified": 8, "dpi": 50},
}

# Two Gloo training processes on the CPU sharing each batch (test_distributed*.py).
TWO = {"train": TINY["train"] | {"processes": 2, "precision": "fp32"}}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def tiny_train_params(**changes: object) -> Any:
    """The committed `train` section, made tiny: 3 epochs of batch 32 on the CPU in fp32
    (results independent of the CPU: `auto` picks bf16 where there is AMX)."""
    import train
    from pipeline.params import parse_section

    defaults = yaml.safe_load(committed_params_text())["train"]
    tiny = {
        "epochs": 3,
        "batch_size": 32,
        "device": "cpu",
        "lr": 0.05,
        "warmup_epochs": 0.5,
        "precision": "fp32",
    }
    return parse_section(train.TrainParams, defaults | tiny | changes)


def save_untrained_model(path: Path, width: int = 4, seed: int = 0) -> Any:
    """A freshly initialised network written as the train stage writes its model
    (pipeline.model.save_model), with the tiny train params; returned in eval mode."""
    import torch

    import train
    from pipeline.model import resnet18, save_model

    torch.manual_seed(seed)
    net = resnet18(width=width)
    params = {"model": train.ModelParams(width=width), "train": tiny_train_params()}
    save_model(path, net, params, {"mean": 0.13, "std": 0.31})
    return net.eval()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (magic 0x08 = unsigned byte, then ndim)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images whose class (0..9) is a bright bar at a class-specific row."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images, labels.astype(np.uint8)


@pytest.fixture(scope="session")
def synthetic_files() -> dict[str, bytes]:
    """Decompressed bytes of four small synthetic MNIST-format files."""
    train_x, train_y = synthetic_digits(300, seed=1)
    test_x, test_y = synthetic_digits(100, seed=2)
    return {
        "train-images-idx3-ubyte": idx_bytes(train_x),
        "train-labels-idx1-ubyte": idx_bytes(train_y),
        "t10k-images-idx3-ubyte": idx_bytes(test_x),
        "t10k-labels-idx1-ubyte": idx_bytes(test_y),
    }


@pytest.fixture(scope="session")
def synthetic_checksums(synthetic_files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in synthetic_files.items()}


@pytest.fixture
def synthetic_mirror(tmp_path: Path, synthetic_files: dict[str, bytes]) -> Path:
    """A folder laid out like a public MNIST mirror (<name>.gz)."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in synthetic_files.items():
        (mirror / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    return mirror


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    """Serves `<mode>/<file>` from the mirror folder, faulty as `mode` says."""

    mirror: Path

    def do_GET(self) -> None:
        mode, _, name = self.path.strip("/").partition("/")
        path = self.mirror / name
        if mode == "missing" or not path.exists():
            self.send_error(404, "Not Found")
            return
        if mode in ("redirect", "samehost"):  # to another host name, or to the same one
            host = "localhost" if mode == "redirect" else "127.0.0.1"
            self.send_response(302)
            self.send_header("Location", f"http://{host}:{self.server.server_port}/ok/{name}")
            self.end_headers()
            return
        body = path.read_bytes()
        length = len(body)
        if mode == "short":  # promises the whole file, sends half
            body = body[: length // 2]
        elif mode == "cut":  # a consistent but truncated file
            body = body[: length // 2]
            length = len(body)
        elif mode == "notgzip":
            body = gzip.decompress(body)
            length = len(body)
        elif mode == "badlength":
            self.send_response(200)
            self.send_header("Content-Length", "lots")
            self.end_headers()
            self.wfile.write(body)
            return
        elif mode == "wrongsum":
            body = gzip.compress(gzip.decompress(body)[:-1] + b"\x01", mtime=0)
            length = len(body)
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_mirror(synthetic_mirror: Path) -> Iterator[str]:
    """Base URL of a local HTTP server; append `ok/`, `missing/`, `short/`, ... ."""
    handler = type("Handler", (_MirrorHandler,), {"mirror": synthetic_mirror})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def mnist_mirror() -> str:
    """The real MNIST mirror from MNIST_MIRROR (a folder made absolute, or a URL)."""
    mirror = os.environ.get("MNIST_MIRROR")
    if not mirror:
        pytest.skip("set MNIST_MIRROR (e.g. ../shared/mnist) to run the tests on real MNIST")
    if "://" in mirror:
        return mirror
    if not Path(mirror).is_dir():
        pytest.fail(f"MNIST_MIRROR={mirror} is not a folder (from {Path.cwd()}) nor a URL")
    return str(Path(mirror).resolve())


def write_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def processes_running(script: bytes, folder: Path) -> list[int]:
    """Pids of the processes working in `folder` whose command line has an argument that
    starts with `script` (b"src/" for any stage, say), or names it by an absolute path
    (the workers of a multi-process training run); Linux (/proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(a.startswith(script) or b"/" + script in a for a in argv) and Path(
                    os.readlink(entry / "cwd")
                ) == Path(folder):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    return process._start_time(pid) is not None


def write_processed(project: Path, n_train: int = 400, n_val: int = 50) -> None:
    """Synthetic digits as the preprocess stage writes them (no mirror needed)."""
    import torch

    from preprocess import resize

    processed = project / "data/processed"
    processed.mkdir(parents=True)
    x, y = synthetic_digits(n_train + n_val, seed=3)
    images, labels = resize(torch.from_numpy(x)), torch.from_numpy(y).long()
    for split, part in (("train", slice(0, n_train)), ("val", slice(n_train, None))):
        torch.save({"images": images[part], "labels": labels[part]}, processed / f"{split}.pt")
    (processed / "stats.json").write_text('{"mean": 0.13, "std": 0.3}')


def wait_until(condition: Callable[[], bool], seconds: float = 10, every: float = 0.01) -> None:
    """Poll `condition` every `every` seconds until it holds or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(every)


def command_env(**env: str) -> dict[str, str]:
    """The environment of a command a test runs: this interpreter's bin/ first on PATH
    (so `python` and `dvc` are ours, activated or not), no DVC analytics, a git author."""
    return (
        os.environ
        | {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
        }
        | env
    )


def run_cmd(
    args: list[str], cwd: Path, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run a command in command_env(); by default fail the test if it fails."""
    result = subprocess.run(args, cwd=cwd, env=command_env(**env), capture_output=True, text=True)
    if check and result.returncode != 0:
        output = f"{result.stdout}\n{result.stderr}"
        raise AssertionError(f"{args} failed ({result.returncode}):\n{output}")
    return result


def make_project(dest: Path) -> Path:
    """A copy of the project (code, params, dvc.yaml) at `dest` with the tiny params."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, dest / name)
    (dest / "params.yaml").write_text(committed_params_text())  # not an experiment's values
    write_params(dest, TINY)
    return dest


def init_repo(project: Path) -> None:
    """Make `project` a git and DVC repository as a clone of this one is: `dvc init`, then
    the committed DVC config and plot templates (`dvc init` refuses an existing .dvc/)."""
    run_cmd(["git", "init", "-q"], cwd=project)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], cwd=project)
    shutil.copy(ROOT / ".dvc/config", project / ".dvc/config")  # plots.html_template
    shutil.copytree(ROOT / ".dvc/plots", project / ".dvc/plots")
    run_cmd(["git", "add", "-A"], cwd=project)
    run_cmd(["git", "commit", "-qm", "project"], cwd=project)


@dataclasses.dataclass(frozen=True)
class TinyRepo:
    """A git and DVC repository of the project with the tiny params, on real MNIST."""

    path: Path
    first_repro: str  # what `dvc repro` printed from nothing
    second_repro: str  # and right after, with nothing changed


@contextlib.contextmanager
def built_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder that the first test process to ask fills (in the block, while the others
    wait) and every test process then shares: a session fixture built once for all the
    processes of pytest-xdist. The block finds the folder empty only when it must fill it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each test process's own
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done = shared / f"{name}.done"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            yield folder
            done.touch()
        else:
            yield folder


def _built_repo(folder: Path) -> TinyRepo:
    return TinyRepo(
        folder / "project",
        (folder / "first.txt").read_text(),
        (folder / "second.txt").read_text(),
    )


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: str) -> TinyRepo:
    """`dvc repro` from nothing, run once for the whole test run and committed on `main`
    (the baseline): what a clone holds once pulled. Tests change copies of it
    (copy_repo), never it."""
    with built_once(tmp_path_factory, "tiny-repo") as folder:
        if not (folder / "project").exists():
            project = make_project(folder / "project")
            init_repo(project)
            run_cmd(["git", "branch", "-M", "main"], cwd=project)
            for name in ("first", "second"):
                done = run_cmd(
                    [sys.executable, "-m", "dvc", "repro"], cwd=project, MNIST_MIRROR=mnist_mirror
                )
                (folder / f"{name}.txt").write_text(done.stdout + done.stderr)
            run_cmd(["git", "add", "-A"], cwd=project)
            run_cmd(["git", "commit", "-qm", "baseline"], cwd=project)
        return _built_repo(folder)


LOW_LR = "low-lr"  # the experiment of tiny_experiment
LOW_LR_VALUE = 0.01


@pytest.fixture(scope="session")
def tiny_experiment(tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory) -> TinyRepo:
    """tiny_repo with the experiment LOW_LR (`dvc exp run -S train.lr=0.01`) run and
    applied to the workspace, as `dvc exp run` leaves it; first_repro is what it
    printed. Built once for the whole test run; tests change copies of it (copy_repo)."""
    with built_once(tmp_path_factory, "tiny-experiment") as folder:
        if not (folder / "project").exists():
            project = copy_repo(tiny_repo.path, folder / "project")
            exp = [sys.executable, "-m", "dvc", "exp", "run", "-S", f"train.lr={LOW_LR_VALUE}"]
            done = run_cmd([*exp, "-n", LOW_LR], cwd=project)
            (folder / "first.txt").write_text(done.stdout + done.stderr)
            (folder / "second.txt").write_text("")
        return _built_repo(folder)


def copy_repo(source: Path, dest: Path) -> Path:
    """A copy of a repository with its workspace and DVC cache, as if made there."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns("tmp"))
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project (code, params, dvc.yaml) with the tiny params, not yet a repo."""
    return make_project(tmp_path / "project")


@pytest.fixture
def interrupt_handlers() -> Iterator[None]:
    """The stages' Ctrl-C/SIGTERM/SIGHUP handlers (process.run() installs them), put back
    after."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {signum: signal.getsignal(signum) for signum in signals}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if pytest runs in `&`
    process.install_interrupt_handlers()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    process._deferring = 0
    process._pending.clear()
    process._stopping = False
