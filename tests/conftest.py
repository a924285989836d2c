"""Shared fixtures and helpers: one set of fast overrides, the ``stx`` command, MLflow queries."""

import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

from stx.engine import encoders
from stx.engine.optim import OptimizationCallback
from stx.runs.schema import ASSETS_DIR, CONF_DIR

FAST = ["encoder.weights=random", "judge.weights=random", "schedule.size=32", "schedule.steps=2"]
"""Overrides for a job that takes about a second: random weights, 32 px, 2 steps."""
STX = [str(Path(sys.executable).with_name("stx"))]
CONTENT = ASSETS_DIR / "content.png"
STYLE = ASSETS_DIR / "style.png"


def run_stx(folder, *args, env=None, timeout=300):
    """Run the ``stx`` command in ``folder`` with outputs under ``folder/runs``."""
    environment = {**os.environ, "STX_RUNS_DIR": str(Path(folder) / "runs"), **(env or {})}
    return subprocess.run(STX + list(args), cwd=folder, env=environment, capture_output=True, text=True, timeout=timeout)


def stx_here(folder, *args, env=None):
    """:func:`run_stx` without a new process: ``stx.cli.main`` with ``args`` as its command line,
    run in this process from ``folder`` (what it prints and its exit status are returned as
    ``run_stx`` returns them). For what the command does; what only a process of its own shows
    (signals, the console script's exit without teardown, import-time behaviour, a launcher's
    child processes) stays with :func:`run_stx`. Warnings are filtered and printed to its stderr as
    Python does in a process of its own. The process-wide state ``main`` changes (the environment,
    the working folder, signal handlers, Hydra's logging and global state) is put back."""
    from stx import cli
    from stx.runs import interrupts, runner

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_signals = {signum: signal.getsignal(signum) for signum in interrupts.STOP_SIGNALS}
    saved_sweep_workers = interrupts.sweep_workers  # a sweep's callback sets it
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.update({"STX_RUNS_DIR": str(Path(folder) / "runs"), **(env or {})})
    os.chdir(folder)
    sys.argv = [*STX, *args]
    cli._Task.started, interrupts.received, runner._first_job = False, None, False
    GlobalHydra.instance().clear()
    code = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()  # Python's default filters, and warnings printed to (captured) stderr, as in a process
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = warnings._showwarning_orig
            try:
                cli.main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
    finally:
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in saved_root[0]:
                handler.close()
        root.handlers[:], root.level = saved_root
        for signum, handler in saved_signals.items():
            signal.signal(signum, handler)
        interrupts.sweep_workers, interrupts.received = saved_sweep_workers, None
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([*STX, *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty sqlite MLflow store with MLflow's tables made (the migrations take seconds): see
    :func:`fresh_store`."""
    from stx.runs.store import open_sqlite_store

    path = tmp_path_factory.mktemp("store_template") / "mlflow.db"
    open_sqlite_store(f"sqlite:///{path}")
    return path


def place_store(template, folder):
    """Copy the empty store ``template`` to where jobs run in ``folder`` log (``folder/runs/mlflow.db``),
    as the first job there would create it; returns its client."""
    (Path(folder) / "runs").mkdir(parents=True, exist_ok=True)
    shutil.copy(template, Path(folder) / "runs" / "mlflow.db")
    return client_for(folder)


@pytest.fixture
def fresh_store(store_template):
    """``fresh_store(folder)``: :func:`place_store` of the session's empty store."""
    return lambda folder: place_store(store_template, folder)


def local_uri(folder):
    return f"sqlite:///{Path(folder) / 'runs' / 'mlflow.db'}"


def client_for(folder):
    return MlflowClient(local_uri(folder))


def only_run(folder):
    client = client_for(folder)
    (run,) = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    return client, run


def artifact_paths(client, run_id, path=""):
    paths = []
    for item in client.list_artifacts(run_id, path):
        paths.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return paths


def options(group):
    """The selectable options of a config group (files starting with ``_`` are shared bases)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.fixture(scope="session")
def vgg19_random() -> encoders.MultiLayerEncoder:
    """A randomly initialised VGG19 encoder covering the layers the tests use."""
    layers = ["conv1_1", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    return encoders.vgg19(layers, weights="random", pooling="max", seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    """Compose stx's config with overrides (compose API), outputs under a temporary runs dir."""
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()


def free_port():
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server_at(folder, backend=None, port=None):
    """A real ``mlflow server`` on 127.0.0.1 (``port``, default a free one) with its artifacts in
    ``folder`` and ``backend`` behind it (default sqlite in ``folder``): yields its process (the
    leader of its own process group) and URI; stopped afterwards."""
    port = port or free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", backend or f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI job runners polling meanwhile
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core machine takes over 90 s
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start within 180 s")
                time.sleep(0.5)
        yield server, uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # seen with PostgreSQL behind it: stop it hard
                os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, store_template):
    """The URI of an ``mlflow server`` shared by the session's tests, its sqlite store copied from
    :func:`store_template` (no migrations at start)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    shutil.copy(store_template, folder / "mlflow.db")
    with mlflow_server_at(folder) as (_, uri):
        yield uri


@contextmanager
def relay_to(uri):
    """A TCP relay on a free port of 127.0.0.1 to the server at ``uri`` (``http://host:port``):
    yields its URI and a function that takes it away at once, as a killed server goes (listening
    socket and every connection closed; a new connection is refused)."""
    host, port = uri.removeprefix("http://").rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    open_sockets, lock = [listener], threading.Lock()

    def pipe(source, sink):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def accept():
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection((host, int(port)))
                with lock:
                    open_sockets.extend((client, upstream))
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=pipe, args=(source, sink), daemon=True).start()

    def take_away():
        with lock:
            for sock in open_sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", take_away
    finally:
        take_away()


class Totals(OptimizationCallback):
    """Keeps each step's total loss."""

    def __init__(self):
        self.totals = []

    def on_step(self, info):
        self.totals.append(info.values["total"])
