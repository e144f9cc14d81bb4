"""``python -m noprop ...`` is the ``noprop`` command (so ``torchrun -m noprop train ...`` launches it on every rank)."""

import sys

from noprop.cli import main

sys.exit(main())
