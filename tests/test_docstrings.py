"""Every public entry point documents itself: an ``Args:`` block naming every parameter, a
``Returns:`` (or ``Yields:``) block and a ``Raises:`` block (Google style, as in the source).

Public: the ``__all__`` of pyeuler, pyeuler.functional, pyeuler.nn, pyeuler.models,
pyeuler.stability, pyeuler.data and pyeuler.robust, and the public methods a class defines
itself (``head``/``tail`` of the branches).  A class is documented by its class docstring
(parameters of ``__init__``; an inherited ``__init__`` counts as documented by the class
that defines it).  Exceptions, warnings, NamedTuples, dataclasses and constants are not
entry points.  The failure lists every missing item at once.
"""

import dataclasses
import importlib
import inspect
import re

MODULES = ["pyeuler", "pyeuler.functional", "pyeuler.nn", "pyeuler.models", "pyeuler.stability",
           "pyeuler.data", "pyeuler.robust"]
SECTIONS = ("Args", "Arguments", "Returns", "Yields", "Raises", "Warns", "Example", "Examples",
            "Note", "Notes", "References")


def _sections(doc: str) -> dict[str, str]:
    """Section name -> its text, for lines ``Name:`` alone at any indentation."""
    found, current = {}, None
    for line in doc.splitlines():
        header = re.fullmatch(r"\s*([A-Z][a-z]+):\s*", line)
        if header and header.group(1) in SECTIONS:
            current = header.group(1)
            found[current] = ""
        elif current is not None:
            found[current] += line + "\n"
    return found


def _documented_names(args: str) -> set[str]:
    """Names an Args block documents: entries ``name: ...``, ``a, b: ...`` or ``*args: ...``."""
    names = set()
    for entry in re.findall(r"(?m)^\s*(\**[A-Za-z_][\w, *]*):", args):
        names.update(part.strip().lstrip("*") for part in entry.split(","))
    return names


def _is_entry_point(obj) -> bool:
    if inspect.isclass(obj):
        return not (issubclass(obj, BaseException) or dataclasses.is_dataclass(obj)
                    or issubclass(obj, tuple))
    return callable(obj) and not inspect.ismodule(obj)


def _entry_points():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not _is_entry_point(obj):
                continue
            yield f"{module_name}.{name}", obj
            if inspect.isclass(obj):
                for method_name, method in vars(obj).items():
                    if (not method_name.startswith("_") and inspect.isfunction(method)
                            and method_name not in ("forward", "extra_repr")):
                        yield f"{module_name}.{name}.{method_name}", method


def _docs_and_parameters(obj):
    if inspect.isclass(obj):
        docs = [inspect.getdoc(obj) or ""]
        owner = next(c for c in obj.__mro__ if "__init__" in vars(c))
        if owner is not obj and owner.__module__.startswith("pyeuler"):
            docs.append(inspect.getdoc(owner) or "")
        function = owner.__init__
    else:
        docs, function = [inspect.getdoc(obj) or ""], obj
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters if p.name not in ("self", "cls")
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return docs, names


def _problems(qualified: str, obj) -> list[str]:
    docs, names = _docs_and_parameters(obj)
    sections = {}
    for doc in reversed(docs):  # the class's own docstring wins
        sections.update(_sections(doc))
    problems = []
    documented = _documented_names(sections.get("Args", "") + sections.get("Arguments", ""))
    missing = [n for n in names if n not in documented]
    if names and "Args" not in sections and "Arguments" not in sections:
        problems.append(f"{qualified}: no Args block (parameters {', '.join(names)})")
    elif missing:
        problems.append(f"{qualified}: Args block lacks {', '.join(missing)}")
    if "Returns" not in sections and "Yields" not in sections:
        problems.append(f"{qualified}: no Returns/Yields block")
    if "Raises" not in sections:
        problems.append(f"{qualified}: no Raises block")
    return problems


def test_the_checker_reads_google_style_blocks():
    doc = """Summary.

    Args:
        x: a tensor
            spanning lines.
        iters, tol: two at once.
        *args: more.

    Returns:
        y.

    Raises:
        ValueError: when.
    """
    sections = _sections(inspect.cleandoc(doc))
    assert set(sections) == {"Args", "Returns", "Raises"}
    assert _documented_names(sections["Args"]) == {"x", "iters", "tol", "args"}


def test_every_public_entry_point_documents_args_returns_raises():
    entries = list(_entry_points())
    assert len(entries) > 40
    problems = [p for qualified, obj in entries for p in _problems(qualified, obj)]
    assert not problems, ("undocumented public entry points (Google style Args/Returns/Raises):\n"
                          + "\n".join(problems))

