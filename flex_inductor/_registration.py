"""Registers our Inductor lowerings the first time a graph may need them.

Importing Inductor costs seconds, so ``import flex_inductor`` does not do it;
the Dynamo capture and the proxy-tracing rule of the op call this instead.
"""

from __future__ import annotations

import functools


@functools.cache
def ensure_lowerings() -> None:
    """Import ``flex_inductor.lowering``, which registers every lowering."""
    import flex_inductor.lowering  # noqa: F401
