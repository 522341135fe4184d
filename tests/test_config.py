"""plugins.toml loading: every mistake is named with file, table, key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from djinn.cli import CONFIG_ENV, load_config
from djinn.config import DjinnConfig
from djinn.kernel.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plugins.toml"
    path.write_text(text)
    return path


def test_repository_file_equals_builtin_defaults_for_kernel_tables():
    loaded = load_config(REPO / "plugins.toml")
    defaults = DjinnConfig()
    assert loaded.plugins == defaults.plugins
    assert loaded.server == defaults.server
    assert loaded.model == defaults.model
    assert loaded.memory == defaults.memory


def test_unknown_key_names_file_table_and_key(tmp_path):
    path = write(tmp_path, "[server]\nprot = 7070\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "[server]" in message and "'prot'" in message
    assert "port" in message  # the allowed keys are listed


def test_unknown_table_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown table \[sever\]"):
        load_config(write(tmp_path, "[sever]\nport = 1\n"))


def test_bad_value_names_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[model]\ndtype = "float8"\n'))
    assert "dtype" in str(err.value) and "bfloat16" in str(err.value)


def test_wrong_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(write(tmp_path, '[server]\nport = "seventy"\n'))


def test_negative_budget_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="gpu_memory_budget_gb"):
        load_config(write(tmp_path, "[memory]\ngpu_memory_budget_gb = -1\n"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_environment_variable_and_single_name_for_list(tmp_path, monkeypatch):
    path = write(tmp_path, '[plugins]\ntransports = "tcp"\nscheduler = "lru"\n')
    monkeypatch.setenv(CONFIG_ENV, str(path))
    config = load_config()
    assert config.plugins.transports == ("tcp",)
    assert config.plugins.scheduler == "lru"
    assert config.source == str(path)


def test_defaults_when_no_file(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config() == DjinnConfig()


def test_decode_attention_names_its_choices(tmp_path):
    assert load_config(write(tmp_path, '[server]\ndecode_attention = "masked"\n')).server.decode_attention == "masked"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[server]\ndecode_attention = "dense"\n'))
    assert "decode_attention" in str(err.value) and "paged" in str(err.value)
