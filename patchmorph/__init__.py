"""The PatchMorph app, the top layer: the ``patchmorph`` command line, the demo and the local server.

Layers import downward only: ``patchmorph_core`` ← ``pipeline`` ← ``flows`` ← ``patchmorph`` (checked by
import-linter in ``make test``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("patchmorph")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
