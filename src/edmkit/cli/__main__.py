"""``python -m edmkit.cli``: the same as ``python -m edmkit``."""

from edmkit.cli import main

main()
