"""Every public name has a numpydoc docstring whose Parameters section matches its signature.

Public names are those in the ``__all__`` of the documented modules, plus the public methods
(no leading underscore) that a public class defines itself. Checked, and only these:

- ``missing docstring``: a public class, function or method without a docstring;
- ``missing Examples``: a public class or function in ``__all__`` without an ``Examples`` section
  (its doctest runs in the test suite through ``--doctest-modules``);
- ``undocumented parameter``: a signature parameter absent from the Parameters section
  (for classes, the ``__init__`` signature);
- ``unknown parameter``: a Parameters entry that is not in the signature.

``self``/``cls`` are never documented; ``*args``/``**kwargs`` may be listed as ``*args`` or
``**kwargs`` (with or without the stars). An entry ``X, y`` documents both names.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
from numpydoc.docscrape import ClassDoc, FunctionDoc

MODULES = [
    "momaestimator",
    "momaestimator.merging",
    "momaestimator.baselines",
    "momaestimator.analysis",
    "momaestimator.checkpoints",
    "momaestimator.model_selection",
    "momaestimator.metrics",
    "momaestimator.toy",
    "momaestimator.data",
    "momaestimator.models",
]


def _public_objects():
    seen = set()
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue  # submodules are covered through their own __all__; constants have no docstring
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{modname}.{name}", obj, True
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if isinstance(func, property):
                        func = func.fget
                    if not inspect.isfunction(func):
                        continue
                    yield f"{modname}.{name}.{attr}", func, False


PUBLIC = list(_public_objects())


def _documented_names(doc) -> set[str]:
    names = set()
    for param in doc["Parameters"]:
        for part in param.name.split(","):
            part = part.strip().lstrip("*")
            if part:
                names.add(part)
    return names


def _signature_names(obj) -> set[str] | None:
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and not inspect.isfunction(target):
        return set()  # __init__ inherited from a builtin (object, Exception): nothing to document
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    return {p.name for p in sig.parameters.values() if p.name not in ("self", "cls")}


def docstring_problems(qualname, obj, top_level) -> list[str]:
    """The enforced problems of one public object, as readable lines."""
    if isinstance(obj, property):
        obj = obj.fget
    if not inspect.getdoc(obj) or (inspect.isclass(obj) and obj.__doc__ is None):
        return [f"{qualname}: missing docstring"]
    problems = []
    doc = ClassDoc(obj, config={"show_class_members": False}) if inspect.isclass(obj) else FunctionDoc(obj)
    if top_level and not doc["Examples"]:
        problems.append(f"{qualname}: missing Examples section")
    sig = _signature_names(obj)
    if sig is None:
        return problems
    if isinstance(obj, property) or (not doc["Parameters"] and not sig):
        return problems
    documented = _documented_names(doc)
    for name in sorted(sig - documented):
        problems.append(f"{qualname}: parameter {name!r} is not in the Parameters section")
    for name in sorted(documented - sig):
        problems.append(f"{qualname}: Parameters section lists {name!r}, which is not in the signature")
    return problems


@pytest.mark.parametrize(("qualname", "obj", "top_level"), PUBLIC, ids=[q for q, _, _ in PUBLIC])
def test_public_docstring(qualname, obj, top_level):
    problems = docstring_problems(qualname, obj, top_level)
    assert not problems, "\n".join(problems)


def test_checker_catches_mismatches():
    def undocumented(a, b):
        """Do things.

        Parameters
        ----------
        a : int
        c : int
        """

    def nodoc(a):
        pass

    problems = docstring_problems("f", undocumented, True)
    assert "f: missing Examples section" in problems
    assert "f: parameter 'b' is not in the Parameters section" in problems
    assert "f: Parameters section lists 'c', which is not in the signature" in problems
    assert docstring_problems("g", nodoc, False) == ["g: missing docstring"]


def test_every_module_is_covered():
    assert len(PUBLIC) > 50


def test_api_reference_lists_every_public_name():
    """``docs/api.rst`` is what ``docs/make_api_rst.py`` renders from the modules' ``__all__``."""
    import runpy
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    render = runpy.run_path(str(docs / "make_api_rst.py"))["render"]
    assert (docs / "api.rst").read_text() == render(), "docs/api.rst is stale: run python docs/make_api_rst.py"
