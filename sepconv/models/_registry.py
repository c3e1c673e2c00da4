"""The model registry: names -> builders, found by :func:`create_model` and :func:`list_models`."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str | Callable | None = None, /, **fixed):
    """Register a model builder (a class or a function returning an ``nn.Module``).

    ``@register_model`` uses the builder's ``__name__``; ``@register_model("name")`` another name;
    ``@register_model("name", alpha=0.5)`` a variant that always passes ``alpha=0.5`` (passing another
    ``alpha`` to it is an error). Decorators stack, so one class can register several variants.
    """
    if callable(name):
        return register_model()(name)
    if name is not None and not (isinstance(name, str) and name):
        raise TypeError(f"name must be a non-empty str; got {name!r}")

    def decorator(builder):
        key = name or builder.__name__
        if key in _BUILDERS:
            raise ValueError(f"a model named {key!r} is already registered")
        _BUILDERS[key] = _variant(key, builder, fixed) if fixed else builder
        return builder

    return decorator


def unregister_model(name: str) -> None:
    """Remove the registered model ``name`` (e.g. one a test registered); the name can be registered again.

    >>> @register_model("scratch_net")
    ... def scratch_net(num_classes=2):
    ...     return nn.Linear(3, num_classes)
    >>> unregister_model("scratch_net")
    >>> list_models("scratch*")
    []
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {name!r}")
    if name not in _BUILDERS:
        raise ValueError(f"no model named {name!r} is registered")
    del _BUILDERS[name]


def _variant(name: str, builder, fixed: dict):
    def build(**kwargs):
        clashes = [f"{key}={kwargs[key]!r}" for key in fixed if key in kwargs and kwargs[key] != fixed[key]]
        if clashes:
            settings = ", ".join(f"{key}={value!r}" for key, value in fixed.items())
            raise ValueError(f"model {name!r} fixes {settings}; got {', '.join(clashes)}")
        return builder(**{**kwargs, **fixed})

    build.__name__ = name
    build.__doc__ = builder.__doc__
    return build


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (``"mobilenet*"``), sorted.

    >>> list_models("mobilenet_v1*")
    ['mobilenet_v1', 'mobilenet_v1_025', 'mobilenet_v1_050', 'mobilenet_v1_075', 'mobilenet_v1_100']
    """
    return sorted(fnmatch.filter(_BUILDERS, pattern))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (``num_classes``, ``separable``, ...).

    >>> model = create_model("mobilenet_v1", alpha=0.25, num_classes=10)
    >>> sum(p.numel() for p in model.parameters())
    215642
    >>> create_model("mobilenet_v3")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown model name 'mobilenet_v3'; close matches: 'mobilenet_v2', 'mobilenet_v1', ...
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str; got {name!r}")
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=3, cutoff=0.6)
        hint = f"close matches: {', '.join(map(repr, close))}" if close else "no close match"
        raise ValueError(f"unknown model name {name!r}; {hint} (list_models() lists all {len(_BUILDERS)})")
    return _BUILDERS[name](**kwargs)
