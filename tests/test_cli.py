"""The command line as a user meets it: exit codes, messages, and a fast --help."""

from __future__ import annotations

import json
import re
import subprocess
import sys

DJINN = [sys.executable, "-m", "djinn.cli"]


def run(*args, **kwargs):
    return subprocess.run([*DJINN, *args], capture_output=True, text=True, **kwargs)


def test_version_and_help():
    assert run("--version").stdout.startswith("djinn, version")
    assert "plugins" in run("--help").stdout


def test_unknown_plugin_exits_2_naming_the_available_ones():
    result = run("run", "--plugins", "nosuch")
    assert result.returncode == 2
    assert "unknown plugin 'nosuch'" in result.stderr and "semantic [scheduler]" in result.stderr


def test_misspelled_key_exits_2_naming_file_table_and_key(tmp_path):
    path = tmp_path / "plugins.toml"
    path.write_text("[settings.semantic]\nprefetch_margn_s = 1.0\n")
    result = run("run", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "[settings.semantic]" in result.stderr
    assert "'prefetch_margn_s'" in result.stderr and "prefetch_margin_s" in result.stderr


def test_plugins_lists_every_builtin_with_slot_and_origin():
    rows = {r["name"]: r for r in json.loads(run("plugins", "--json").stdout)}
    assert {rows[n]["slot"] for n in ("semantic", "lru", "static")} == {"scheduler"}
    assert rows["ringbuffer"]["slot"] == "streamer" and rows["arrow"]["slot"] == "serializer"
    assert all(rows[n]["origin"] == "djinn" for n in ("tcp", "inproc", "pinned_host"))


def test_config_prints_the_effective_selection():
    out = run("config", "--plugins", "lru,ringbuffer,no:inproc").stdout
    assert 'scheduler = "lru"' in out and 'streamer = "ringbuffer"' in out
    assert 'transports = [\n    "tcp",\n]' in out or 'transports = ["tcp"]' in out


def test_environment_selection_is_honoured():
    import os

    env = dict(os.environ, DJINN_PLUGINS="static")
    assert 'scheduler = "static"' in run("config", env=env).stdout


def test_demo_runs_agents_over_tcp():
    result = run("demo", "--agents", "2", "--turns", "2", timeout=240)
    assert result.returncode == 0, result.stderr
    assert "evictions:" in result.stdout and "agent turns" in result.stdout
    assert int(re.search(r"write-backs: (\d+)", result.stdout).group(1)) > 0  # the demo shows its KV moving
    # the OpenAI-API agent: its model's tool call put the session in IO_WAIT, the tool result resumed it
    assert "finish_reason 'tool_calls': get_weather" in result.stdout and "now IO_WAIT" in result.stdout
    assert "resumed it: COMPUTE" in result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(result, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_run_refuses_a_port_in_use_before_loading_the_model():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("run", "--port", str(port), "--metrics-port", "0", "--http-port", "0")
    _one_line_error(result, f"127.0.0.1:{port}", "--port")
    assert "serving" not in result.stdout


def test_run_refuses_a_port_out_of_range():
    _one_line_error(run("run", "--port", "99999"), "--port 99999", "0-65535")


def test_run_refuses_a_public_host_without_a_token():
    result = run("run", "--host", "0.0.0.0", env={**_env_without_token()})
    _one_line_error(result, "0.0.0.0", "token")


def _env_without_token() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "DJINN_TOKEN"}


def test_run_names_a_missing_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    result = run("run", "--model", str(missing), "--port", "0", "--metrics-port", "0", "--http-port", "0")
    _one_line_error(result, "no model directory", str(missing))


def test_status_prints_a_table_and_json():
    import attrs

    from djinn.kernel.plugins import get_plugin_manager
    from djinn.server.launch import BackgroundServer
    from tests.serving import serving_config

    config = serving_config()
    config = attrs.evolve(config, server=attrs.evolve(config.server, metrics_port=_free_port()))
    with BackgroundServer(config, get_plugin_manager(config, ["tcp"])) as server:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics/vmu"
        table = run("status", "--url", url)
        raw = run("status", "--url", url, "--json")
    assert table.returncode == 0, table.stderr
    assert "random:tiny-llama" in table.stdout and "device budget" in table.stdout and "sessions" in table.stdout
    assert "{" not in table.stdout
    assert json.loads(raw.stdout)["model"] == "random:tiny-llama"


def test_status_without_a_server_is_one_line():
    _one_line_error(run("status", "--url", f"http://127.0.0.1:{_free_port()}/metrics/vmu"), "no server answered")


def test_plugins_table_keeps_whole_names_at_80_columns():
    import os

    names = [r["name"] for r in json.loads(run("plugins", "--json").stdout)]
    table = run("plugins", env={**os.environ, "COLUMNS": "80"}).stdout
    words = set(table.replace("│", " ").replace("┃", " ").split())
    assert [n for n in names if n not in words] == []


def test_generating_raises_no_future_warning():
    code = (
        "import warnings; warnings.simplefilter('error', FutureWarning)\n"
        "from djinn.engine.models import load_model\n"
        "from djinn.engine.runner import ModelRunner, greedy_generate\n"
        "runner = ModelRunner(load_model('random:tiny-llama'))\n"
        "print(greedy_generate(runner, runner.new_kv(), runner.ids_tensor([1, 2, 3]), 3))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr
