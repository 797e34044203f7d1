"""``python -m momaestimator``: the ``momaestimator`` command (see :mod:`momaestimator.checkpoints.cli`)."""

import sys

from momaestimator.checkpoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
