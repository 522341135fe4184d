"""What every result file records about the software it ran on."""

from __future__ import annotations

import platform
from typing import Any


def library_versions() -> dict[str, Any]:
    """Python, torch, transformers and djinn versions, and the CUDA runtime torch was built with."""
    import torch
    import transformers

    from djinn import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "djinn": __version__, "cuda": torch.version.cuda}
