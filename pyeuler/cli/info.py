"""``pyeuler info``: versions, devices and which backends are available (and why not)."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="versions, devices and available backends")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args) -> int:
    import pyeuler
    from pyeuler.benchmark import environment

    env = environment()
    backends = pyeuler.available_backends()
    env["backends"] = {name: {"available": ok, "reason": why} for name, (ok, why) in backends.items()}
    env["default_backend"] = pyeuler.get_backend()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    print(f"pyeuler {env['pyeuler']}  torch {env['torch']}  CUDA {env['cuda']}  "
          f"triton {env['triton']}  python {env['python']}")
    print(f"device: {env['device']}")
    print(f"default backend: {env['default_backend']} (set with PYEULER_BACKEND or pyeuler.set_backend)")
    for name, (ok, why) in backends.items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {why}")
    return 0
