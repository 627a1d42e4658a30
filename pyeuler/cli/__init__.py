"""``pyeuler`` command line: ``info``, ``bench``, ``cost``, ``train``, ``eval``, ``stability``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which
registers the subcommand and sets ``func`` to the function that runs it.
"""

from __future__ import annotations

import argparse
import sys

import torch

from pyeuler.cli import bench, cost, eval as eval_cmd, info, stability, train

_SUBCOMMANDS = (info, bench, cost, train, eval_cmd, stability)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyeuler",
        description="Fast, robust Euler ResNets: explicit step factor h and implicit Euler skips.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return int(args.func(args) or 0)
    finally:  # a command's --threads ends with it when main() is called in-process
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
