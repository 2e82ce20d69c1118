"""The ``dynconv`` command: ``run``, ``inspect``, ``autotune``, ``bench``, ``plot``, ``overhead``.

Each subcommand lives in its own module with a ``main(argv)``; this file only dispatches, so a
subcommand's imports (matplotlib, the kernels) load only when it runs.
"""
from __future__ import annotations

import importlib
import sys

from dynconv.console import EXIT_STATUSES

SUBCOMMANDS = {
    "run": ("dynconv.demo", "the main job: benchmark + plots on a GPU, interpreter demo + plots without"),
    "inspect": ("dynconv.inspect", "registers, spills, load widths per kernel (AOT); --bounds: predicted roofline fractions"),
    "autotune": ("dynconv.autotune", "sweep kernel configurations on this GPU and write the JSON"),
    "bench": ("dynconv.bench", "measure every op and provider on this GPU, write the reports folder"),
    "plot": ("dynconv.plot", "draw throughput and roofline plots from the reports folder's csv files"),
    "overhead": ("dynconv.overhead", "host (CPU) time per op call at a small shape, launches stubbed or real"),
}


def _usage() -> str:
    lines = ["usage: dynconv [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "dynconv <command> --help for a command's options.", "", EXIT_STATUSES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dynconv import __version__  # the one place the version is written
        print(f"dynconv {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dynconv: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
