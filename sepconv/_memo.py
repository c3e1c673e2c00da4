"""Memoisation for the pure Python work done on every call (geometry, padding plans)."""

from __future__ import annotations

import functools

import torch


def memoised(function):
    """Cache ``function`` by its (hashable) arguments, except while compiling or tracing.

    Layers call the ops with the same arguments every step, and resolving them costs as much as a
    small convolution. Under ``torch.compile``/``torch.export`` sizes may be symbolic (unhashable) and
    the work happens once at trace time anyway; unhashable arguments (lists) skip the cache.
    """
    cached = functools.lru_cache(maxsize=4096, typed=True)(function)

    @functools.wraps(function)
    def call(*args):
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return function(*args)
        try:
            return cached(*args)
        except TypeError:  # unhashable arguments; a TypeError from `function` itself is raised again below
            return function(*args)

    call.cache_clear = cached.cache_clear
    return call
