"""connhex-edge-ota: over-the-air firmware updates as a pluggy plugin.

Plugin authors need one name from here: ``hookimpl``, the marker for hook
implementations of the ``connhex_edge`` project.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

PROJECT = "connhex_edge"
"""The pluggy project name and the entry-point group every plugin registers in."""

hookimpl = pluggy.HookimplMarker(PROJECT)
hookspec = pluggy.HookspecMarker(PROJECT)

try:
    __version__ = version("connhex-edge-ota")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["PROJECT", "__version__", "hookimpl", "hookspec"]
