"""The ``djinn`` command line. Start-up imports no torch: heavy modules load inside commands."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from djinn import __version__
from djinn.kernel.errors import ConfigError, DjinnError, PluginError

if TYPE_CHECKING:
    from djinn.config import DjinnConfig
    from djinn.kernel.plugins import DjinnPlugins

F = TypeVar("F", bound=Callable[..., Any])
CONFIG_ENV = "DJINN_CONFIG"
DEFAULT_FILE = "plugins.toml"


def load_config(path: str | os.PathLike[str] | None = None) -> DjinnConfig:
    """Read and validate the configuration: ``path`` (``--config``), else ``$DJINN_CONFIG``, else
    ``./plugins.toml``, else the built-in defaults."""
    import tomllib

    from djinn.config import DjinnConfig, parse_config

    if path is None:
        path = os.environ.get(CONFIG_ENV) or Path.cwd() / DEFAULT_FILE
        if isinstance(path, Path) and not path.is_file():
            return DjinnConfig()  # no file named and none here: the built-in defaults
    resolved = Path(path)
    try:
        data = tomllib.loads(resolved.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{resolved}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{resolved}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(resolved))


def split_plugin_names(text: str | None) -> list[str]:
    """The names in ``--plugins`` (and ``$DJINN_PLUGINS``):
    ``"semantic, ringbuffer,no:tcp"`` -> ``["semantic", "ringbuffer", "no:tcp"]``."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def plugin_rows(plugins: DjinnPlugins) -> list[dict[str, Any]]:
    """One row per installed plugin for ``djinn plugins``."""
    selected = plugins.selected_plugins()
    return [
        {
            "name": info.name, "slot": info.slot, "strategies": [s.name for s in info.strategies],
            "origin": info.origin, "version": info.version, "hooks": list(info.hooks),
            "selected": info.name in selected and info.error is None, "error": info.error,
        }
        for info in sorted(plugins.catalog.values(), key=lambda p: (p.slot, p.name))
    ]


def _fail_cleanly(fn: F) -> F:
    """Turn configuration and plugin errors into a message on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, PluginError) as exc:
            click.echo(f"djinn: {exc}", err=True)
            sys.exit(2)
        except DjinnError as exc:
            click.echo(f"djinn: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _selection_options(fn: F) -> F:
    fn = click.option(
        "--plugins", "plugin_names", envvar="DJINN_PLUGINS", default="",
        help="Comma-separated plugin names to select (e.g. semantic,ringbuffer); no:NAME blocks one.",
    )(fn)
    fn = click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None,
        help="plugins.toml to read (default: $DJINN_CONFIG, then ./plugins.toml, then built-in defaults).",
    )(fn)
    return fn


def _load(config_path: str | None, plugin_names: str, adjust: Callable[[Any], Any] | None = None, **changes: Any):
    """The configuration with the CLI's ``changes`` (then ``adjust``) applied, and its plugins."""
    from djinn.kernel.plugins import get_plugin_manager

    config = load_config(config_path)
    if changes:
        config = _with_changes(config, changes)
    if adjust is not None:
        config = adjust(config)
    return config, get_plugin_manager(config, split_plugin_names(plugin_names))


def _with_changes(config, changes: dict[str, Any]):
    """Apply CLI options that override ``[server]`` and ``[model]`` keys."""
    import attrs

    server = {k: v for k, v in changes.items() if k in ("host", "port", "metrics_port", "http_port") and v is not None}
    model = {k: v for k, v in changes.items() if k in ("name", "dtype", "device") and v is not None}
    return attrs.evolve(
        config,
        server=attrs.evolve(config.server, **server),
        model=attrs.evolve(config.model, **model),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="djinn")
def main() -> None:
    """Djinn: a tensor operating system for GPUs.

    One server owns the GPU, the model weights and every session's KV cache; thin clients
    connect, generate, pause at breakpoints and signal their phase so idle KV leaves the GPU.
    """


@main.command("plugins")
@_selection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_fail_cleanly
def plugins_command(config_path: str | None, plugin_names: str, as_json: bool) -> None:
    """List every installed plugin: slot, origin, hooks, and whether it is selected."""
    from djinn.kernel.plugins import DjinnPlugins

    plugins = DjinnPlugins(load_config(config_path))
    plugins.discover()
    try:
        plugins.select(split_plugin_names(plugin_names))
        problem = None
    except (ConfigError, PluginError) as exc:  # still list what is installed, then fail
        problem = exc
    rows = plugin_rows(plugins)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        if problem is not None:
            raise problem
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="djinn plugins")
    origins = [f"{r['origin']} {r['version']}" for r in rows]
    # names and origins are never cut: the hooks column wraps instead
    table.add_column("name", no_wrap=True, min_width=max((len(r["name"]) for r in rows), default=4))
    table.add_column("slot", no_wrap=True)
    table.add_column("origin", no_wrap=True, min_width=max((len(o) for o in origins), default=6))
    table.add_column("hooks", overflow="fold")
    table.add_column("selected", overflow="fold")
    for r in rows:
        hooks = ", ".join(h.removeprefix("djinn_") for h in r["hooks"])
        state = "[red]broken: " + r["error"] + "[/red]" if r["error"] else ("yes" if r["selected"] else "")
        table.add_row(r["name"], r["slot"], f"{r['origin']} {r['version']}", hooks, state)
    Console().print(table)
    if problem is not None:
        raise problem


@main.command("config")
@_selection_options
@_fail_cleanly
def config_command(config_path: str | None, plugin_names: str) -> None:
    """Print the effective configuration (file, defaults and --plugins applied) as TOML."""
    import attrs
    import tomli_w

    config, plugins = _load(config_path, plugin_names)
    data = attrs.evolve(config, plugins=plugins.selection).to_dict()
    for name, settings in plugins.settings.items():
        data["settings"][name] = attrs.asdict(settings)
    click.echo(f"# source: {config.source}")
    click.echo(tomli_w.dumps(_toml_ready(data)))


def _toml_ready(value: Any) -> Any:
    """TOML has no null: drop None values (they mean "unset")."""
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    return value


@main.command("run")
@_selection_options
@click.option("--model", "model_name", default=None, help="A local model directory or random:NAME (e.g. random:tiny-llama).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--host", default=None, help="Address to bind (non-loopback needs --token or $DJINN_TOKEN).")
@click.option("--port", default=None, type=int)
@click.option("--metrics-port", default=None, type=int, help="Prometheus /metrics port (0 disables).")
@click.option("--http-port", default=None, type=int, help="OpenAI-compatible HTTP API port (0 disables).")
@click.option("--token", envvar="DJINN_TOKEN", default=None, help="Shared secret clients must present.")
@_fail_cleanly
def run_command(config_path, plugin_names, model_name, dtype, device, host, port, metrics_port, http_port,
                token) -> None:
    """Start the server with the selected plugins and serve until interrupted."""
    config, plugins = _load(
        config_path, plugin_names, name=model_name, dtype=dtype, device=device,
        host=host, port=port, metrics_port=metrics_port, http_port=http_port,
    )
    _check_before_loading(config, token)
    from djinn.server.launch import serve_forever

    serve_forever(config, plugins, token=token, announce=click.echo)


def _check_before_loading(config, token: str | None) -> None:
    """What would only fail after the model loaded, refused at once: a bad or busy port, a
    non-loopback host without a token, a model directory that does not exist."""
    import os
    import socket

    from djinn.server.loop import is_loopback

    server = config.server
    ports = {"--port": server.port, "--metrics-port": server.metrics_port, "--http-port": server.http_port}
    for option, port in ports.items():
        if not 0 <= port <= 65535:
            raise DjinnError(f"{option} {port} is not a port number (0-65535)")
    if not is_loopback(server.host) and not token:
        raise DjinnError(f"binding {server.host} (not loopback) requires a token: --token or $DJINN_TOKEN")
    for option, port in ports.items():
        if port == 0:
            continue
        with socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                probe.bind((server.host, port))
            except OSError as exc:
                raise DjinnError(f"cannot listen on {server.host}:{port} ({option}): {exc.strerror}") from None
    name = config.model.name
    if not name.startswith("random:") and not os.path.isdir(name):
        raise DjinnError(
            f"no model directory at {name!r} (a model is a local transformers checkpoint directory or random:NAME)"
        )


@main.command("cluster")
@_selection_options
@click.option("--model", "model_name", default=None, help="A local model directory or random:NAME, served by every server.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--servers", default=None, type=click.IntRange(min=1),
              help="Servers to start (default: one per GPU of the Ray cluster, one without GPUs).")
@click.option("--gpus-per-server", default=None, type=click.FloatRange(min=0),
              help="GPUs each server holds (default 1 with GPUs, 0 without; 0.5 puts two on one GPU).")
@click.option("--cpus-per-server", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--gpu-memory-gb", default=None, type=click.FloatRange(min=0),
              help="Each server's GPU budget ([memory] gpu_memory_budget_gb; set it when servers share a GPU).")
@click.option("--address", default=None, help="A running Ray cluster to join (default: start Ray on this machine).")
@click.option("--strategy", default="PACK", show_default=True,
              type=click.Choice(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]),
              help="How Ray places the servers' bundles across hosts.")
@click.option("--host", default=None, help="Address the router binds (non-loopback needs --token or $DJINN_TOKEN).")
@click.option("--port", default=None, type=int, help="The router's port (default: [server] port).")
@click.option("--http-port", default=None, type=int,
              help="The router's OpenAI-compatible HTTP API port (default: [server] http_port; 0 disables).")
@click.option("--server-host", default="127.0.0.1", show_default=True,
              help="Where each server listens; 'node' for its Ray node's address (servers on other hosts).")
@click.option("--token", envvar="DJINN_TOKEN", default=None, help="Shared secret clients must present to the router.")
@click.option("--migrate/--no-migrate", default=True, show_default=True,
              help="Move idle sessions off a server that runs out of memory.")
@click.option("--low-water", default=0.1, show_default=True, type=click.FloatRange(0, 0.5, max_open=True),
              help="A server is out of memory below this share of its capacity free.")
@_fail_cleanly
def cluster_command(config_path, plugin_names, model_name, dtype, servers, gpus_per_server, cpus_per_server,
                    gpu_memory_gb, address, strategy, host, port, http_port, server_host, token, migrate,
                    low_water) -> None:
    """Start one server per GPU as Ray actors and a router in front; serve until interrupted.

    Clients connect to the router as to one server. Needs Ray: pip install 'djinn[cluster]'.
    """
    import signal
    import threading

    import attrs

    config, _plugins = _load(config_path, plugin_names, name=model_name, dtype=dtype, host=host, port=port,
                             http_port=http_port)
    if gpu_memory_gb is not None:
        config = attrs.evolve(config, memory=attrs.evolve(config.memory, gpu_memory_budget_gb=gpu_memory_gb))
    _check_router_address(config.server.host, config.server.port, token, "--port")
    if config.server.http_port:
        _check_router_address(config.server.host, config.server.http_port, token, "--http-port")
    from djinn.cluster.launch import start_cluster
    from djinn.cluster.router import RouterSettings

    cluster = start_cluster(
        config, split_plugin_names(plugin_names), servers=servers, gpus_per_server=gpus_per_server,
        cpus_per_server=cpus_per_server, address=address, strategy=strategy, host=config.server.host,
        port=config.server.port, http_port=config.server.http_port or None, token=token, server_host=server_host,
        settings=RouterSettings(migrate=migrate, low_water=low_water),
    )
    try:
        router = cluster.router.router
        for name, backend in router.backends.items():
            click.echo(f"server {name}: {backend.url}")
        http = f" and {cluster.router.http_url}" if cluster.router.http is not None else ""
        click.echo(f"djinn {__version__} cluster of {len(router.backends)} serving {config.model.name}; "
                   f"router on {', '.join(cluster.router.urls)}{http}")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        cluster.stop()
        click.echo("djinn cluster stopped")


def _check_router_address(host: str, port: int, token: str | None, option: str) -> None:
    """A router address that cannot work, refused before any server starts."""
    import socket

    from djinn.server.loop import is_loopback

    if not 0 <= port <= 65535:
        raise DjinnError(f"{option} {port} is not a port number (0-65535)")
    if not is_loopback(host) and not token:
        raise DjinnError(f"binding {host} (not loopback) requires a token: --token or $DJINN_TOKEN")
    if port:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise DjinnError(f"cannot listen on {host}:{port} ({option}): {exc.strerror}") from None


@main.command("demo")
@_selection_options
@click.option("--model", "model_name", default=None, help="Model to serve (default: the configured one).")
@click.option("--agents", default=3, show_default=True, help="Client agents to run at once.")
@click.option("--turns", default=3, show_default=True, help="generate -> tool call -> resume turns per agent.")
@_fail_cleanly
def demo_command(config_path, plugin_names, model_name, agents, turns) -> None:
    """Start a server and a few agents over TCP loopback in one process; print what happened."""
    from djinn.demo import demo_config, run_demo

    config, plugins = _load(config_path, plugin_names, demo_config, name=model_name, port=0, metrics_port=0)
    if plugins.selection.scheduler == "semantic":
        click.echo("the demo's semantic scheduler writes back at every IO_WAIT (write_back_headroom = 1.0)")
    run_demo(config, plugins, agents=agents, turns=turns, echo=click.echo)


@main.command("status")
@click.option("--url", default="http://127.0.0.1:9095/metrics/vmu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON instead of a table.")
@_fail_cleanly
def status_command(url: str, as_json: bool) -> None:
    """Print a running server's memory and session view (its /metrics/vmu endpoint)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (an address the user chose)
            data = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DjinnError(f"no server answered at {url}: {exc}") from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    Console().print(_status_table(data))


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _status_table(data: dict[str, Any]):
    """``/metrics/vmu`` as one two-column table: memory, sessions, admission, counters, engine."""
    from rich.table import Table

    table = Table(title=f"djinn status: {data.get('model', '?')}", show_header=False)
    table.add_column("what", no_wrap=True, style="bold")
    table.add_column("value", overflow="fold")
    memory = data.get("memory", {})
    table.add_row("device budget", _size(memory.get("budget_bytes")))
    table.add_row("device used", f"{_size(memory.get('device_used_bytes'))} (peak {_size(memory.get('device_peak_bytes'))})")
    for category, n in memory.get("device", {}).items():
        table.add_row(f"  {category}", _size(n))
    for tier, stats in data.get("tiers", {}).items():
        used, capacity = stats.get("used_bytes"), stats.get("capacity_bytes")
        table.add_row(f"tier {tier}", f"{_size(used)} of {_size(capacity)}")
    sessions = data.get("sessions", {})
    table.add_row("sessions", str(sessions.get("total", 0)))
    for key in ("by_phase", "by_residency"):
        counts = sessions.get(key) or {}
        if counts:
            table.add_row(f"  {key.removeprefix('by_')}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    table.add_row("admission queue", str(data.get("admission_queue", 0)))
    for name, value in data.get("counters", {}).items():
        if value:
            table.add_row(name.replace("_", " "), f"{value:.3f}" if isinstance(value, float) and not value.is_integer()
                          else str(int(value)))
    engine = data.get("engine", {})
    for key in ("device", "steps", "mean_batch", "prefill_tokens", "kv_pool_blocks_used", "kv_pool_blocks"):
        if key in engine:
            value = engine[key]
            table.add_row(f"engine {key.replace('_', ' ')}", f"{value:.2f}" if isinstance(value, float) else str(value))
    return table


if __name__ == "__main__":  # pragma: no cover
    main()
