"""``python -m ppstage.cli``: what torchrun runs on every rank (see deploy/)."""

import sys

from ppstage.cli import main

sys.exit(main())
