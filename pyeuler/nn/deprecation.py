"""Arguments that moved from positional to keyword-only keep working for one release.

Version 0.2.0 made every module's and builder's arguments after its structural ones
(sizes: channels, planes, stride, depth, width) keyword-only (CHANGELOG.md).  A call that
still passes them by position is bound by their old names, with a ``DeprecationWarning``;
0.3.0 will refuse it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable, TypeVar

__all__ = ["keyword_only_since"]

DEPRECATED_IN = "0.2.0"
REMOVED_IN = "0.3.0"

F = TypeVar("F", bound=Callable)


def keyword_only_since(*old_positional: str) -> Callable[[F], F]:
    """Decorate a function whose parameters ``old_positional`` (in their old positional
    order) became keyword-only, right after the ones it still takes by position.

    Args:
        *old_positional: the moved parameters' names, in the order they used to be taken
            by position; each must be a keyword-only parameter of the decorated function.

    Returns:
        A decorator.  The decorated function has the new signature
        (``inspect.signature`` shows it); given more positional arguments than that
        signature takes, it binds the extra ones to ``old_positional`` by name and warns.

    Raises:
        TypeError: at decoration, when a name is not a keyword-only parameter; at a call,
            when more positional arguments are passed than the old signature took, or a
            moved argument is passed both by position and by keyword.

    Warns:
        DeprecationWarning: at a call that passes moved arguments by position, naming them
            and the release that will refuse it.
    """

    def decorate(fn: F) -> F:
        parameters = inspect.signature(fn).parameters
        keyword_only = [n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY]
        unknown = [n for n in old_positional if n not in keyword_only]
        if unknown:
            raise TypeError(f"{fn.__qualname__}: {unknown} are not keyword-only parameters")
        positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                         for p in parameters.values())
        name = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > positional:
                moved = args[positional:]
                if len(moved) > len(old_positional):
                    raise TypeError(f"{name}() takes at most "
                                    f"{positional + len(old_positional)} positional arguments "
                                    f"({len(args)} given)")
                names = old_positional[:len(moved)]
                twice = [n for n in names if n in kwargs]
                if twice:
                    raise TypeError(f"{name}() got multiple values for {', '.join(twice)}")
                warnings.warn(
                    f"{name}(): passing {', '.join(names)} by position is deprecated since "
                    f"pyeuler {DEPRECATED_IN} and fails from {REMOVED_IN}; pass "
                    f"{', '.join(f'{n}=...' for n in names)} by keyword",
                    DeprecationWarning, stacklevel=2)
                kwargs.update(zip(names, moved))
                args = args[:positional]
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
