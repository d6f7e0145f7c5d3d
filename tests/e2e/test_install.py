"""A new user's install: `make dist` builds both wheels, pip installs them into a
fresh venv from dist/ alone (no index), and that venv's `ledger-service`
migrates, initializes a ledger and serves a client on loopback.

Marked `install` because it is slower than most: it builds two wheels, creates
a venv and runs pip (about ten seconds in all), though never with a network.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ledger_client import LedgerClient

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def new_user_env() -> dict[str, str]:
    """This environment without what would let the dev tree or its settings leak
    into the fresh venv (PYTHONPATH, VIRTUAL_ENV, PIP_*, LEDGER_*)."""
    leaks = ("PYTHON", "VIRTUAL_ENV", "PIP_", "LEDGER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(leaks)}


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{argv}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wheel_files(dist: Path, project: str) -> set[str]:
    [wheel] = dist.glob(f"{project}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def third_party_packages(dest: Path) -> Path:
    """The dev venv's installed packages except ours, linked into `dest`.

    The fresh venv sees them through a .pth file, so pip finds grpcio, SQLAlchemy...
    already installed without a network, while ledger-client and ledger-service
    (editable in the dev venv) are not there: pip has to take them from dist/.
    """
    dest.mkdir()
    paths = sysconfig.get_paths()
    for site in {Path(paths["purelib"]), Path(paths["platlib"])}:
        for item in site.iterdir():
            if item.name.startswith(("ledger", "__editable__")) or item.suffix == ".pth":
                continue
            (dest / item.name).symlink_to(item)
    return dest


def wait_for_port(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text())
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"the installed server did not start:\n{log.read_text()}")


def assert_each_wheel_holds_its_project(dist: Path) -> None:
    service = wheel_files(dist, "ledger_service")
    # Every module, the Alembic migrations and their template: what serve needs.
    shipped = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "ledger_service").rglob("*")
        if path.suffix in (".py", ".mako", ".typed") and "__pycache__" not in path.parts
    }
    assert shipped <= service, f"missing from the wheel: {sorted(shipped - service)}"
    assert "ledger_service/storage/migrations/env.py" in service
    # A build directory shared by the two projects would put the client here too.
    assert not {name for name in service if name.startswith(("ledger/", "ledger_client/"))}
    client = wheel_files(dist, "ledger_client")
    assert {
        "ledger/v1/ledger_pb2.py",
        "ledger/v1/ledger_pb2.pyi",
        "ledger_client/py.typed",
    } <= client


def fresh_venv(path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A venv without our packages that sees the third-party ones: (venv, its site-packages)."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent, env=env)
    python = str(path / "bin" / "python")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(run([python, "-c", purelib], cwd=path.parent, env=env).strip())
    deps = third_party_packages(path.parent / "deps")
    (site_packages / "dev-deps.pth").write_text(f"{deps}\n")
    return path, site_packages


WHERE_FROM = """
import ledger.v1.ledger_pb2, ledger_client, ledger_service
for module in (ledger.v1.ledger_pb2, ledger_client, ledger_service):
    print(module.__file__)
"""


def test_the_wheels_install_offline_and_the_installed_server_serves(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # --assume-old: the dev venv is used as it is; this test never reinstalls it.
    run(
        ["make", "--assume-old=.venv/.installed", "dist", f"DIST={dist}", f"BIN={BIN}"],
        cwd=ROOT,
    )
    assert_each_wheel_holds_its_project(dist)

    env = new_user_env()
    venv, site_packages = fresh_venv(tmp_path / "venv", env)
    python = str(venv / "bin" / "python")
    # --isolated: no pip config file or PIP_* variable adds an index or find-links.
    pip = [python, "-m", "pip", "--isolated", "install", "--no-index", "--find-links", str(dist)]
    installed = run([*pip, "ledger-service"], cwd=tmp_path, env=env)
    assert "Successfully installed ledger-client-0.1.0 ledger-service-0.1.0" in installed
    modules = run([python, "-c", WHERE_FROM], cwd=tmp_path, env=env).split()
    assert len(modules) == 3
    assert all(Path(module).is_relative_to(site_packages) for module in modules), modules

    command = str(venv / "bin" / "ledger-service")
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    run([command, "migrate", "--database-url", url], cwd=tmp_path, env=env)
    init = [command, "init-counter", "--ledger", "demo", "--database-url", url]
    assert run(init, cwd=tmp_path, env=env).strip() == "ledger demo: counter created, value 0"

    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [command, "serve", "--listen", "127.0.0.1:0", "--database-url", url],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        address = f"127.0.0.1:{wait_for_port(proc, log)}"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with LedgerClient(address) as ledger:
            posted = ledger.post_entry(
                "demo", debit_account="cash", credit_account="sales", amount=1250, asset="USD"
            )
            assert (posted.entry.sequence, posted.replayed) == (1, False)
            assert [entry.sequence for entry in ledger.stream_entries("demo")] == [1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
