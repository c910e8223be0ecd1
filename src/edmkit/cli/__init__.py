"""The ``edmkit`` command line: train, generate, restore, phema, metrics, dataset, report, train-classifier, import, video.

Library code raises ValueError / OSError; this package alone turns them into one-line errors with a
non-zero exit code (``user_errors``) and sets ``torch.backends`` flags (``pick_device``).

Layout: ``_common`` holds the click group ``main`` and the shared helpers; each command module registers its
commands on ``main`` when imported below. Heavy imports (training, sampling, metrics) stay inside the commands,
so ``edmkit --help`` is fast.
"""

from edmkit.cli._common import main  # the console-script entry point (pyproject: edmkit.cli:main)

__all__ = ["main"]
from edmkit.cli import dataset, generate, interop, metrics, posthoc, train, video  # noqa: F401, E402  (registers the commands on main)
