"""pyeuler: fast, robust ResNets as Euler ODE solvers.

- step factor h (Zhang et al., IJCAI 2019): each block is ``y = x + h·F(x)``;
- IE-Skips (Li, He, Lin, ICML 2020): K gradient steps toward the implicit Euler solution.

See ``pyeuler.functional`` (ops), ``pyeuler.nn`` (modules), ``pyeuler.models`` (builders).
"""

from pyeuler._version import __version__
from pyeuler.backend import BACKENDS, available_backends, get_backend, resolve_backend, set_backend

__all__ = ["BACKENDS", "__version__", "available_backends", "get_backend", "resolve_backend",
           "set_backend"]
