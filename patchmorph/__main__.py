"""``python -m patchmorph``: the same as the ``patchmorph`` command."""

from patchmorph.cli import main

main()
