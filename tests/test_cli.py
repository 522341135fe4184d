"""The command line as a user meets it: exit codes, messages, and a fast --help."""

from __future__ import annotations

import json
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
