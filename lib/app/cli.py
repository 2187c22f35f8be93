"""``spine1k``: the workspace's one command (``python -m lib`` is the same).

    spine1k reproduce [--profile synthetic] [--force] [--stages 02-04]   the study, stage by stage
    spine1k evaluate --gt DIR --pred DIR --out DIR [...]                  score a folder of masks
    spine1k check-params [PROFILE ...]                                    validate every params file
    spine1k report [--profile synthetic] [--screenshot PNG]               rebuild the run report

Each subcommand is also its module's own entry point (``python -m lib.app.pipeline``,
``python -m lib.evaluation``, ``python -m lib.core.params``, ``python -m lib.app.report``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lib.app import pipeline, report
from lib.core import params
from lib.evaluation import cli as evaluation_cli

COMMANDS: dict[str, tuple[Callable[[Sequence[str] | None], int], str]] = {
    "reproduce": (pipeline.main, "run the notebooks in order into runs/<profile>/ (skips up-to-date stages)"),
    "evaluate": (evaluation_cli.main, "per-vertebra Dice, HD95, ASSD, NSD, identification of a folder of masks"),
    "check-params": (params.main, "validate every params/<profile>/NN_stage.yaml against its notebook"),
    "report": (report.main, "build runs/<profile>/report.html (optionally a screenshot)"),
}


def usage() -> str:
    lines = ["usage: spine1k COMMAND [options]   (spine1k COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:13s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``spine1k COMMAND ...``; returns the command's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"spine1k: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    return int(COMMANDS[name][0](rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
