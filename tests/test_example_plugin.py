"""The example third-party plugin: installed from its own directory, found with no change to djinn.

It is installed by tox (``tox -e example``) or, here, into a temporary virtual environment that
sees this environment's packages; never into the environment running the tests.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "djinn-fifo-scheduler"

SERVE = """
import json
from djinn.client import connect
from tests.serving import serving_config, start_server

server = start_server(serving_config(), ["fifo", "tcp"])
try:
    with connect(server.url("tcp")) as client, client.model().session() as session:
        tokens = session.generate([1, 2, 3], max_new_tokens=3).tokens
    print(json.dumps({"scheduler": type(server.kernel.scheduler).__name__, "tokens": tokens}))
finally:
    server.stop()
"""


def _installed_here() -> bool:
    try:
        importlib.metadata.distribution("djinn-fifo-scheduler")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An interpreter that has the example installed: this one when it already has (tox's
    ``example`` environment), else one of a temporary virtual environment it was installed into."""
    if _installed_here():
        return sys.executable
    venv = tmp_path_factory.mktemp("example-venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    interpreter = venv / "bin" / "python"
    purelib = subprocess.run([interpreter, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # --system-site-packages reaches only the base interpreter's packages, not those of the virtual
    # environment running the tests (torch, djinn, pip, setuptools): add its site directories
    # with their .pth files (djinn's editable install is one)
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    Path(purelib, "_outer_environment.pth").write_text("\n".join(lines) + "\n")
    # built from a copy: a build writes its build/ and egg-info directories beside the sources
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("example-source") / EXAMPLE.name,
                             ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([interpreter, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source)], check=True, cwd=venv)
    return str(interpreter)


def djinn(python: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the CLI with ``python`` and return what it printed."""
    return subprocess.run([python, "-m", "djinn.cli", *args], check=True, capture_output=True, text=True,
                          env=env).stdout


def test_djinn_plugins_lists_it_with_its_origin(python):
    env = {k: v for k, v in os.environ.items() if k != "DJINN_PLUGINS"}  # the default selection
    rows = {r["name"]: r for r in json.loads(djinn(python, "plugins", "--json", env=env))}
    assert rows["fifo"]["origin"] == "djinn-fifo-scheduler"
    assert rows["fifo"]["slot"] == "scheduler"
    assert rows["fifo"]["selected"] is False


def test_plugins_option_selects_it(python):
    out = djinn(python, "config", "--plugins", "fifo")
    assert 'scheduler = "fifo"' in out
    assert "max_victims = 8" in out


def test_it_serves_requests(python):
    out = subprocess.run([python, "-c", SERVE], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["scheduler"] == "FifoScheduler"
    assert len(served["tokens"]) == 3
