"""The README's Python example runs as written against the README's own default server."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from djinn.kernel.config import DjinnConfig
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_URL = "tcp://127.0.0.1:7070"


def python_snippets() -> list[str]:
    """Every ```python block of the README that connects to a server."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if "connect(" in b]


def test_the_readme_example_runs_against_the_default_model(capsys):
    snippets = python_snippets()
    assert snippets, "the README shows no client example"
    defaults = DjinnConfig()
    # the README's default server (its model, plugins and URL), on free ports so tests run side by side
    config = attrs.evolve(defaults, server=attrs.evolve(defaults.server, port=0, metrics_port=0))
    assert config.model.name == "random:tiny-llama"
    with BackgroundServer(config, get_plugin_manager(config)) as server:
        url = server.url("tcp")
        for snippet in snippets:
            assert DEFAULT_URL in snippet
            exec(compile(snippet.replace(DEFAULT_URL, url), str(README), "exec"), {})  # noqa: S102 (our own README)
        opened = server.call(lambda: len(server.kernel.sessions))
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("3 decode") for line in printed)  # the trace reached layer 3 on a decode step
    assert opened == 0  # the example's session was closed
