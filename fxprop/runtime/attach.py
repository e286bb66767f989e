"""Where a client keeps what it attached to an object it accelerates, and how to find it.

The diffusers glue (:mod:`fxprop.clients.pipelines`) stores its adapter, which holds the
runtime, in the pipeline's own ``__dict__`` under :data:`ATTRIBUTE`: the pipeline owns it and
drops it with itself. Export and calibration, below the clients, find the runtime of such an
object with :func:`runtime_of` without knowing which client attached it.
"""

from __future__ import annotations

from typing import Any

from .accelerated import AcceleratedUNet

__all__ = ["ATTRIBUTE", "runtime_of"]

#: The ``__dict__`` key of the adapter a client attached (an object with a ``runtime``).
ATTRIBUTE = "_fxprop"


def runtime_of(owner: Any) -> AcceleratedUNet | None:
    """The runtime of an accelerated pipeline (policy, captures), or None."""
    adapter = getattr(owner, "__dict__", {}).get(ATTRIBUTE)
    return None if adapter is None else adapter.runtime
