"""House rules that code review alone would miss."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from djinn.kernel import hookspecs
from djinn.kernel.plugins import declared_hookspecs

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


def test_kernel_never_imports_the_layers_that_call_it():
    """Not even for type annotations: the wire, the engine, the server and the whole configuration
    (``djinn.config``, the server's and the model's tables) depend on the kernel."""
    layers = ("djinn.wire", "djinn.engine", "djinn.server", "djinn.config")
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "djinn" / "kernel").rglob("*.py")
        for name in _imports(p)
        if any(name == layer or name.startswith(layer + ".") for layer in layers)
    ]
    assert offenders == []


def _runtime_imports(path: Path) -> list[str]:
    """Modules ``path`` imports when it runs (imports under ``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner) for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


#: what each layer's modules may import of djinn (anything else is a dependency the wrong way)
_ALLOWED = {
    "kernel": ("djinn.kernel",),
    # the whole configuration: the kernel's tables and machinery, the server's and the model's tables
    "config": ("djinn.kernel",),
    # how bytes move, shared by the client, the server and the transport and serializer plugins
    "wire": ("djinn.kernel", "djinn.wire"),
    "engine": ("djinn.kernel", "djinn.engine"),
    "server": ("djinn.kernel", "djinn.config", "djinn.wire", "djinn.engine", "djinn.server", "=djinn"),
    "client": ("djinn.kernel", "djinn.wire", "djinn.client"),
    "testing": ("djinn.kernel", "djinn.wire", "djinn.engine.streaming", "djinn.testing", "djinn.arena"),
    # the cluster drives whole servers: never the engine or the plugins directly
    "cluster": ("djinn.kernel", "djinn.config", "djinn.wire", "djinn.server", "djinn.client", "djinn.cluster", "=djinn"),
    # the contracts they implement (the streamer's is the engine's), the tiers' arena, and
    # djinn.plugins for a slot's own private module (the next test allows no other)
    "plugins": ("djinn.kernel", "djinn.wire", "djinn.engine.streaming", "djinn.arena", "djinn.plugins"),
}


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    """``name`` is one of ``prefixes`` or inside one; ``=NAME`` allows that module alone
    (``djinn`` itself, for ``__version__``, without everything under it)."""
    return any(name == p[1:] if p.startswith("=") else name == p or name.startswith(p + ".") for p in prefixes)


def _layer_files(layer: str) -> list[Path]:
    """The files of a layer: a package's modules, or the one module ``djinn/LAYER.py``."""
    module = ROOT / "djinn" / f"{layer}.py"
    return [module] if module.is_file() else list((ROOT / "djinn" / layer).rglob("*.py"))


def test_imports_point_one_way_between_the_layers():
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for layer, prefixes in _ALLOWED.items()
        for p in _layer_files(layer)
        for name in _runtime_imports(p)
        if name.startswith("djinn") and not _allowed(name, prefixes)
    ]
    assert offenders == []


def test_plugins_use_the_contracts_and_never_each_other():
    contracts = tuple(prefix for prefix in _ALLOWED["plugins"] if prefix != "djinn.plugins")
    offenders = []
    for p in (ROOT / "djinn" / "plugins").rglob("*.py"):
        slot = p.parent.name
        for name in _runtime_imports(p):
            own_helper = name.startswith(f"djinn.plugins.{slot}._")  # a private module of its own slot
            if name.startswith("djinn") and not (_allowed(name, contracts) or own_helper):
                offenders.append(f"{p.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_the_kernel_runs_without_torch():
    offenders = [
        f"{p.relative_to(ROOT)}: {name}"
        for p in (ROOT / "djinn" / "kernel").rglob("*.py")
        for name in _runtime_imports(p)
        if name.split(".")[0] in ("torch", "transformers")
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
    """Every hook: the kernel's and those the other layers declare (the ``djinn.hookspecs`` group)."""
    return [
        (name, fn) for module in (hookspecs, *declared_hookspecs())
        for name, fn in inspect.getmembers(module, inspect.isfunction)
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


def test_each_hook_is_declared_by_the_layer_that_calls_it():
    declared = {name: fn.__module__ for name, fn in _hookspecs()}
    offenders = [
        f"{p.relative_to(ROOT)}: {name} is declared in {declared.get(name)}"
        for p in (ROOT / "djinn").rglob("*.py")
        for name in re.findall(r'notify\(\s*"(djinn_\w+)"', p.read_text())
        if declared.get(name) != f"djinn.{p.relative_to(ROOT / 'djinn').parts[0]}.hookspecs"
    ]
    assert offenders == []


def test_cli_start_up_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, djinn.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_contracts_plugins_import_do_not_import_torch():
    """Plugins load at discovery, also in the CLI: the wire and streamer contracts stay torch-free."""
    import subprocess
    import sys

    code = (
        "import sys, djinn.wire.contracts, djinn.wire.frames, djinn.engine.streaming, djinn.kernel.strategies; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
