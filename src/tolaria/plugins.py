"""User code named in the configuration as ``module:function``.

Datasets and hosts may come from the user's own code.  Resolving such a reference and
checking the keyword arguments the config passes to it happen here, once, so every
mistake (a missing module, a misspelt function, an argument it does not accept, an
exception raised inside it) is one ``ConfigError`` naming the offending config field and
the reference, not a traceback from deep inside an import or a call (``tolaria --debug``
shows that traceback).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tolaria.errors import ConfigError, TolariaError


def is_reference(name: str) -> bool:
    """``module:function`` (as opposed to a built-in's plain name)."""
    return ":" in name


def resolve_callable(reference: str, field: str) -> Callable[..., Any]:
    """Import ``module:function`` (the function part may be dotted: ``pkg.mod:Class.make``).

    Modules are found in the current directory too, as ``python -m`` would find them.
    """
    module_name, _, attr_path = reference.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"{field}={reference!r}: expected 'module:function'")
    _importable_from_cwd()
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{field}={reference!r}: cannot import module {module_name!r} ({exc})"
        ) from None
    except Exception as exc:  # the user's module itself fails as it is imported
        raise ConfigError(
            f"{field}={reference!r}: importing {module_name!r} raised {exc!r}"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"{field}={reference!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise ConfigError(f"{field}={reference!r}: {attr_path!r} is not callable")
    return target


def _importable_from_cwd() -> None:
    """Put the current directory first on ``sys.path`` unless it is there already.

    The ``tolaria`` console script's ``sys.path`` starts with its own bin directory, not
    the current one, so ``mymodels:make_model`` beside the user's config would not import;
    first (as ``python -m``, uvicorn and gunicorn do) so the user's own module is the one
    found.  Only when a reference is resolved: built-in names never touch ``sys.path``.
    """
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def check_kwargs(
    function: Callable[..., Any],
    kwargs: Mapping[str, Any],
    field: str,
    *,
    positional: int = 0,
) -> None:
    """Fail before the call if ``function`` cannot take ``kwargs`` after ``positional`` args.

    Binding against the signature separates "the config passed an argument this
    function does not have" (the user's config is wrong: ``ConfigError``) from a
    ``TypeError`` raised inside the function (a bug in the function: left alone).
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    try:
        signature.bind(*([None] * positional), **kwargs)
    except TypeError as exc:
        accepted = [
            p.name
            for p in list(signature.parameters.values())[positional:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        unknown = [k for k in kwargs if k not in signature.parameters]
        if unknown:
            raise ConfigError(
                f"{field}: unknown argument(s) {', '.join(map(repr, unknown))} "
                f"(accepted: {', '.join(accepted) or 'none'})"
            ) from None
        raise ConfigError(f"{field}: {exc}") from None


def construct(factory: Callable[..., Any], field: str, *args: Any, **kwargs: Any) -> Any:
    """Call user code named in the config; a failure inside it is one line naming ``field``.

    A Tolaria error raised inside passes through as it is (it already names its cause).
    """
    try:
        return factory(*args, **kwargs)
    except TolariaError:
        raise
    except Exception as exc:
        name = getattr(factory, "__qualname__", repr(factory))
        raise ConfigError(f"{field}: {name}(...) raised {exc!r}") from exc


def make_callbacks(specs: Sequence[Any]) -> list[Any]:
    """The callbacks ``run.callbacks`` names (``module:Class`` with ``kwargs``), built."""
    callbacks = []
    for index, spec in enumerate(specs):
        field = f"run.callbacks.{index}"
        factory = resolve_callable(spec.name, f"{field}.name")
        check_kwargs(factory, spec.kwargs, f"{field}.kwargs")
        callbacks.append(construct(factory, f"{field}.name={spec.name!r}", **spec.kwargs))
    return callbacks
