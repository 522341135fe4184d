"""House rules that code review alone would miss."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from djinn.kernel import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_kernel_never_imports_plugins():
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "djinn" / "kernel").rglob("*.py")
        for name in _imports(p)
        if name.startswith("djinn.plugins")
    ]
    assert offenders == []


def test_nothing_in_the_package_can_unpickle():
    forbidden = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "djinn").rglob("*.py")
        for name in _imports(p)
        if name.split(".")[0] in forbidden
    ]
    assert offenders == []


def _hookspecs():
    return [
        (name, fn) for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("djinn_")
    ]


def test_every_hookspec_has_a_docstring_and_typed_parameters():
    specs = _hookspecs()
    assert len(specs) >= 15
    for name, fn in specs:
        assert fn.__doc__ and len(fn.__doc__.strip()) > 20, name
        params = inspect.signature(fn).parameters.values()
        assert all(p.annotation is not inspect.Parameter.empty for p in params), name


def test_every_hookspec_is_exercised_by_some_test():
    sources = "\n".join(
        p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != "test_architecture.py"
    )
    missing = [name for name, _ in _hookspecs() if name not in sources]
    assert missing == []


def test_cli_start_up_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, djinn.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
