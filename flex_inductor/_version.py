"""The package's code version: a content hash of its source and templates.

It travels inside every call of the op (in ``kernel_options``), so any change
to the lowering or the templates changes the graphs that Inductor's and
AOTAutograd's caches key on, and a stale compiled kernel is never replayed.
"""

from __future__ import annotations

import hashlib
from importlib import resources

# The key under which the hash rides in kernel_options (not a user option).
CODE_VERSION_KEY = "_FLEX_INDUCTOR_CODE_VERSION"
_PACKAGES = ("flex_inductor", "flex_inductor.lowering", "flex_inductor.templates")
_SUFFIXES = (".py", ".jinja")


def _hash_sources() -> str:
    """SHA-256 (first 16 hex digits) over every source file of the package."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        root = resources.files(package)
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.is_file() and entry.name.endswith(_SUFFIXES):
                digest.update(entry.name.encode())
                digest.update(entry.read_bytes())
    return digest.hexdigest()[:16]


# Computed once at import: Dynamo reads it as a constant while tracing.
CODE_VERSION = _hash_sources()
