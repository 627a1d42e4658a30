"""pyeuler: fast, robust ResNets as Euler ODE solvers.

- step factor h (Zhang et al., IJCAI 2019): each block is ``y = x + h·F(x)``;
- IE-Skips (Li, He, Lin, ICML 2020): K gradient steps toward the implicit Euler solution.

See ``pyeuler.functional`` (ops), ``pyeuler.nn`` (modules), ``pyeuler.models`` (builders).
"""

import importlib

from pyeuler._version import __version__
from pyeuler.backend import BACKENDS, available_backends, get_backend, resolve_backend, set_backend

# Imported on first attribute access (``pyeuler.nn.PreActBranch``), as torch exposes its
# submodules, so that ``import pyeuler`` stays cheap and imports neither Triton nor the
# training stack.
SUBMODULES = ("functional", "nn", "models", "robust", "stability", "data")

__all__ = ["BACKENDS", "__version__", "available_backends", "get_backend", "resolve_backend",
           "set_backend", *SUBMODULES]


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"pyeuler.{name}")
    raise AttributeError(f"module 'pyeuler' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
