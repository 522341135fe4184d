"""What every result file records about the software it ran on."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def library_versions() -> dict[str, Any]:
    """Python, torch, transformers and djinn versions, and the CUDA runtime torch was built with."""
    import torch
    import transformers

    from djinn import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "djinn": __version__, "cuda": torch.version.cuda}


def result_header(benchmark: str, module: str, note: str, config: dict[str, Any],
                  argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The fields every result file starts with: what ran, the command that ran it (``module``
    with ``argv``, the process's arguments by default), the machine, the software, the setup."""
    from eval.bench_transport import hardware

    args = sys.argv[1:] if argv is None else argv
    return {"benchmark": benchmark, "command": f"python -m {module} " + " ".join(args), "note": note,
            "commit": source_commit(), "hardware": hardware(), "versions": library_versions(), "config": config}


def source_commit() -> str:
    """The commit the measured code came from: ``$DJINN_COMMIT`` (set where the tree travels
    without its repository), else ``git rev-parse HEAD``, else "unknown"."""
    import os
    import subprocess

    if os.environ.get("DJINN_COMMIT"):
        return os.environ["DJINN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
