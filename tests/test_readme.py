"""The README's Python examples run as written: the native and OpenAI ones against the README's
own default server, the chat example against a model directory with a tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from djinn.config import DjinnConfig
from djinn.kernel.plugins import get_plugin_manager
from djinn.server.launch import BackgroundServer
from djinn.testing.scripted import build_model_dir
from tests.serving import serving_config, start_server

README = Path(__file__).resolve().parent.parent / "README.md"
NATIVE_URL = "tcp://127.0.0.1:7070"
HTTP_URL = "http://127.0.0.1:8000/v1"


def python_snippets() -> list[str]:
    """Every ```python block of the README that talks to a server."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if NATIVE_URL in b or HTTP_URL in b]


def run_snippet(snippet: str, server: BackgroundServer) -> None:
    code = snippet.replace(NATIVE_URL, server.url("tcp")).replace(HTTP_URL, server.http_url)
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 (the repository's own README)


def test_the_readme_examples_run_against_the_default_server(capsys):
    snippets = [s for s in python_snippets() if "chat.completions" not in s]
    assert any(NATIVE_URL in s for s in snippets) and any(HTTP_URL in s for s in snippets)
    defaults = DjinnConfig()
    assert defaults.model.name == "random:tiny-llama"
    # the README's default server (its model and plugins), on free ports so tests run side by side
    config = attrs.evolve(defaults, server=attrs.evolve(defaults.server, port=0, metrics_port=0))
    with BackgroundServer(config, get_plugin_manager(config), http_port=0) as server:
        for snippet in snippets:
            run_snippet(snippet, server)
        opened = server.call(lambda: sorted(s.owner is not None for s in server.kernel.sessions.values()))
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("3 decode") for line in printed)  # the trace reached layer 3 on a decode step
    assert printed[-1].startswith("[") and printed[-1].endswith(" 0")  # 8 token ids, nothing cached yet
    assert opened == [True]  # only the OpenAI example's named session stays open


def test_the_readme_chat_example_runs_against_a_model_with_a_tokenizer(tmp_path, capsys):
    [snippet] = [s for s in python_snippets() if "chat.completions" in s]
    server = start_server(serving_config(build_model_dir(tmp_path / "model")), overrides=["tcp"], http_port=0)
    try:
        run_snippet(snippet, server)
    finally:
        server.stop()
    assert capsys.readouterr().out.split()[0] == "tool_calls"
