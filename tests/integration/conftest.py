"""Real services for the scale-out tests, started on loopback in a temporary folder and always stopped.

- :func:`postgres`: a PostgreSQL cluster (``initdb`` + ``pg_ctl``, run as the ``postgres`` user
  when the tests run as root: PostgreSQL refuses root) with a database ``mlflow``.
- :func:`slurm`: a one-node SLURM cluster on this machine (``munged``, ``slurmctld``, ``slurmd``;
  CPU only, 4 job slots) with accounting (``slurmdbd`` on a private MariaDB server, so ``sacct``
  reports how jobs ended), whose ``slurm.conf`` the client commands find through ``$SLURM_CONF``.

They need Debian's ``postgresql``, ``slurm-wlm``, ``munge``, ``slurmdbd`` and ``mariadb-server``
packages and run only with ``STX_INTEGRATION=1`` (``.ci/run`` does both); otherwise every test
here is skipped.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import free_port, mlflow_server_at

PACKAGES = "postgresql slurm-wlm munge slurmdbd mariadb-server chromium"
ENABLE = (
    f"integration test: needs real PostgreSQL, SLURM and Chromium; run `apt-get install -y {PACKAGES}` "
    "(Debian), `.venv/bin/pip install -e '.[server]'` and `STX_INTEGRATION=1 .venv/bin/pytest -m integration` "
    "(as .ci/run does)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)
            if os.environ.get("STX_INTEGRATION") != "1":
                item.add_marker(pytest.mark.skip(reason=ENABLE))


def program(name: str) -> str:
    """The path of a service's program (PostgreSQL's live in /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(["/usr/sbin", "/sbin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"))]))
    if found is None:
        pytest.fail(f"STX_INTEGRATION=1 but {name} is not installed: apt-get install -y {PACKAGES}")
    return found


def wait_until(ready, what: str, process: subprocess.Popen | None = None, log: Path | None = None, timeout: float = 60) -> None:
    """Poll ``ready()`` until it is true; fail naming ``what`` (and the end of ``log``) after ``timeout`` s
    or when ``process`` exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or (process is not None and process.poll() is not None):
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
            pytest.fail(f"{what} did not come up within {timeout:.0f} s\n{tail}")
        time.sleep(0.3)


@contextmanager
def daemon(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``command`` in the foreground of its own process group; SIGTERM (then SIGKILL) it afterwards."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if process.poll() is not None:
                break
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass


@contextmanager
def service_dir(prefix: str, owner: str | None = None) -> Iterator[Path]:
    """A fresh folder in the system's temp dir (pytest's is private to root), owned by ``owner``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        shutil.chown(folder, owner, owner)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A PostgreSQL server on a free 127.0.0.1 port with an empty database ``mlflow``; yields its
    SQLAlchemy URI (user ``postgres``, trust authentication on loopback only)."""
    user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    as_user = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    initdb, pg_ctl, createdb = program("initdb"), program("pg_ctl"), program("createdb")
    port = free_port()
    with service_dir("stx-postgres-", user if os.geteuid() == 0 else None) as folder:
        data, log = folder / "data", folder / "postgres.log"
        run = lambda *command: subprocess.run(as_user + list(command), check=True, capture_output=True, text=True)  # noqa: E731
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        try:
            run(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
            run(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
            yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """The URI of a real PostgreSQL database shared by a test module, with MLflow's tables made
    (``mlflow db upgrade``, as on a real deployment: a server then starts in seconds)."""
    if importlib.util.find_spec("psycopg") is None:
        pytest.fail("STX_INTEGRATION=1 but the PostgreSQL driver is missing: .venv/bin/pip install -e '.[server]'")
    with postgres_cluster() as uri:
        subprocess.run([str(Path(sys.executable).with_name("mlflow")), "db", "upgrade", uri], check=True, capture_output=True)
        yield uri


@pytest.fixture(scope="module")
def postgres_server(postgres, tmp_path_factory) -> Iterator[str]:
    """The URI of an ``mlflow server`` on :func:`postgres` (artifacts in a temporary folder), shared by a test module."""
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow_server"), backend=postgres) as (_, uri):
        yield uri


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def mariadb(folder: Path) -> Iterator[int]:
    """A MariaDB server with its data, socket and log in ``folder``, on a free 127.0.0.1 port, with
    an empty database ``slurm_acct_db`` for user ``slurm`` (password ``slurm``, from 127.0.0.1 only);
    yields the port."""
    install, server, client = map(program, ["mariadb-install-db", "mariadbd", "mariadb"])
    user = pwd.getpwuid(os.geteuid()).pw_name  # mariadbd runs as root only when told so
    data, unix_socket, port = folder / "data", folder / "mariadb.sock", free_port()
    common = ["--no-defaults", f"--datadir={data}", f"--user={user}", "--innodb-log-file-size=4M"]  # not 96 MB: 1 s, not 5
    subprocess.run([install, *common, "--skip-test-db", "--auth-root-authentication-method=socket"],
                   check=True, capture_output=True)
    options = [f"--socket={unix_socket}", f"--port={port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
               f"--pid-file={folder / 'mariadb.pid'}", f"--log-error={folder / 'mariadb.log'}", "--innodb-flush-log-at-trx-commit=0"]
    with daemon([server, *common, *options], folder / "mariadbd.out") as process:
        wait_until(unix_socket.exists, "MariaDB", process, folder / "mariadb.log")
        sql = ("CREATE DATABASE slurm_acct_db; CREATE USER slurm@'127.0.0.1' IDENTIFIED BY 'slurm'; "
               "GRANT ALL ON slurm_acct_db.* TO slurm@'127.0.0.1'")
        subprocess.run([client, "--no-defaults", f"--socket={unix_socket}", f"--user={user}", f"--execute={sql}"],
                       check=True, capture_output=True)
        yield port


SLURMDBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={folder}/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={folder}/slurmdbd.pid
LogFile={folder}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""

SLURM_CONF = """\
ClusterName=stx
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
# for slurmdbd, the munge socket is given here
AccountingStoragePass={folder}/munge.socket
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
NodeName=stx-node NodeHostname={host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=stx Nodes=stx-node Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def slurm_cluster() -> Iterator[dict[str, str]]:
    """munged, slurmdbd (on :func:`mariadb`), slurmctld and slurmd on this machine (one node
    ``stx-node``, 4 CPUs declared, partition ``stx``, cluster ``stx`` registered for accounting);
    yields the environment that points SLURM's commands at it."""
    munged, mungekey, slurmdbd, sacctmgr, slurmctld, slurmd, sinfo = map(
        program, ["munged", "mungekey", "slurmdbd", "sacctmgr", "slurmctld", "slurmd", "sinfo"])
    with service_dir("stx-slurm-") as folder, ExitStack() as stack:
        for sub in ("state", "spool", "munge", "mariadb"):
            (folder / sub).mkdir(mode=0o700)
        key = folder / "munge" / "munge.key"
        subprocess.run([mungekey, "--create", "--keyfile", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        conf, dbd_conf, dbd_port = folder / "slurm.conf", folder / "slurmdbd.conf", free_port()
        conf.write_text(SLURM_CONF.format(host=socket.gethostname(), folder=folder, ctld_port=free_port(), d_port=free_port(),
                                          dbd_port=dbd_port))
        env = {**os.environ, "SLURM_CONF": str(conf)}  # slurmdbd reads the slurmdbd.conf next to it
        socket_path = folder / "munge.socket"
        munge = stack.enter_context(daemon(
            [munged, "--foreground", "--force", "--key-file", str(key), "--socket", str(socket_path),
             "--pid-file", str(folder / "munge" / "munged.pid"), "--seed-file", str(folder / "munge" / "seed"),
             "--log-file", str(folder / "munge" / "munged.log")], folder / "munged.out"))
        wait_until(socket_path.exists, "munged", munge, folder / "munge" / "munged.log")
        db_port = stack.enter_context(mariadb(folder / "mariadb"))
        dbd_conf.write_text(SLURMDBD_CONF.format(folder=folder, dbd_port=dbd_port, db_port=db_port))
        dbd_conf.chmod(0o600)  # as slurmdbd requires: it holds the database password
        dbd = stack.enter_context(daemon([slurmdbd, "-D"], folder / "slurmdbd.out", env))
        wait_until(lambda: accepts(dbd_port), "slurmdbd", dbd, folder / "slurmdbd.log")
        subprocess.run([sacctmgr, "-i", "add", "cluster", "stx"], env=env, check=True, capture_output=True)
        ctld = stack.enter_context(daemon([slurmctld, "-D", "-i", "-f", str(conf)], folder / "slurmctld.out"))
        node = stack.enter_context(daemon([slurmd, "-D", "-N", "stx-node", "-f", str(conf)], folder / "slurmd.out"))

        def idle() -> bool:
            state = subprocess.run([sinfo, "-h", "-n", "stx-node", "-o", "%t"], env=env, capture_output=True, text=True)
            return state.stdout.strip() == "idle"

        wait_until(lambda: idle() or ctld.poll() is not None, "the SLURM node", node, folder / "slurmd.log")
        wait_until(idle, "slurmctld", ctld, folder / "slurmctld.log")
        yield {"SLURM_CONF": str(conf), "STX_SLURM_PARTITION": "stx"}


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """Environment variables for a test module's jobs to reach a real one-node SLURM cluster."""
    with slurm_cluster() as env:
        yield env
