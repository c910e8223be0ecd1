"""``python -m edmkit`` (and ``torchrun -m edmkit``) entry point."""

from edmkit.cli import main

main()
