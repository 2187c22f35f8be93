"""``python -m lib COMMAND ...`` = ``spine1k COMMAND ...`` (:mod:`lib.app.cli`)."""

from lib.app.cli import main

raise SystemExit(main())
