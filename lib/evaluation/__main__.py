"""``python -m lib.evaluation``: the evaluation command line (:mod:`lib.evaluation.cli`)."""

import sys

from lib.evaluation.cli import main

sys.exit(main())
