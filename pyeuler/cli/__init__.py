"""``pyeuler`` command line: ``info``, ``bench``, ``cost``, ``train``, ``eval``, ``stability``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which
registers the subcommand and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from pyeuler.backend import get_backend
from pyeuler.cli import bench, cost, eval as eval_cmd, info, stability, train

_SUBCOMMANDS = (info, bench, cost, train, eval_cmd, stability)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line (and exit status 2), not the usage block; subcommand
    parsers are made of this class too.  Under torchrun every rank exits 2 and one per
    machine prints the line (:func:`pyeuler.robust.distributed.reports_errors`)."""

    def error(self, message: str):
        from pyeuler.robust.distributed import reports_errors

        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n"
                  if reports_errors() else None)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # what a command-line user needs: the warning, not the library line that raised it
    return f"pyeuler: {category.__name__}: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyeuler",
        description="Fast, robust Euler ResNets: explicit step factor h and implicit Euler skips.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        get_backend()
    except ValueError as e:  # a bad PYEULER_BACKEND
        parser.error(str(e))
    args = parser.parse_args(argv)
    threads, format_warning = torch.get_num_threads(), warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    finally:  # a command's --threads and warning format end with it (main() in-process)
        torch.set_num_threads(threads)
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
