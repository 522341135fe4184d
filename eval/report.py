"""What every result file records about the software it ran on."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
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
            "hardware": hardware(), "versions": library_versions(), "config": config}
