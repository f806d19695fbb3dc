"""torch.compile for the chunked torch paths, where it pays.

The torch engine (CPU, and any device Triton does not serve) runs a chunk function over row chunks of the
logits. Eagerly every op of it is a separate pass over the [n, V] chunk; compiled by inductor, a
formulation written for it (sdar_loss/torch_fused.py) becomes one loop per statistic. Compiling costs
seconds per graph (tens with a cold on-disk inductor cache), so:

- ``wanted(device, elements)``: by default only on CPU (where it is tested and measured) and for calls of
  at least ``COMPILE_MIN_ELEMENTS`` logits; ``SDAR_KERNELS_TORCH_COMPILE=0`` turns it off, ``=1`` compiles
  every call of any size on any device; never inside a graph that dynamo is tracing; never again in a
  process where a compile failed (no C++ compiler, an unsupported device: one warning, then eager);
- ``cached(fn, device=..., key=..., **constants)``: ``fn`` compiled once per process and key, with
  ``constants`` bound to its keyword-only parameters. Every chunk shape shares the graph (dynamic shapes);
  each key compiles its own copy of the function's code, so keys never count against each other in
  dynamo's recompile limit (as does each variant of inference mode / inference tensors); a call with a
  dimension of size 0 or 1 (a one-row tail chunk) runs eagerly, since dynamic shapes specialise those
  sizes and it would cost a second compile;
- ``maybe_compiled(fn, device=..., elements=..., key=..., **constants)``: ``cached`` where ``wanted``,
  else ``fn`` with the constants bound.
Callers pass tensors positionally (dicts of tensors allowed) and put everything structural (dtypes,
which optional inputs exist, string options) into the key or the constants; float constants are traced
as constants.
"""

from __future__ import annotations

import functools
import os
import types
import warnings

import torch

ENV = "SDAR_KERNELS_TORCH_COMPILE"

# 2^24 logits (64 MiB of fp32): N = 512 tokens at V = 32000, or 110 at Qwen's 151936. Below that a call
# takes tens of milliseconds eagerly, less than the compiled loop saves over a few hundred calls of a
# process, and the test suite's tiny cases stay eager.
COMPILE_MIN_ELEMENTS = 1 << 24

# torch.compile's backend; tests of the caching logic swap in a cheaper one (dynamo without inductor)
BACKEND = "inductor"

_CACHE: dict = {}
_BROKEN = False   # a compile failed in this process: run eagerly from then on


def mode() -> str:
    """"0" (off), "1" (always) or "auto" (CPU calls of at least COMPILE_MIN_ELEMENTS), from ``ENV``."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "0"
    if value in ("1", "on", "true", "yes", "always"):
        return "1"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{ENV} must be 0, 1 or auto, got {os.environ[ENV]!r}")


def wanted(device: torch.device, elements: int) -> bool:
    """Whether a call of ``elements`` logits on ``device`` should run compiled (``mode()``; never inside a
    graph dynamo is tracing, nor after a compile has failed in this process)."""
    m = mode()
    if m == "0" or _BROKEN or torch.compiler.is_compiling():
        return False
    return m == "1" or (device.type == "cpu" and elements >= COMPILE_MIN_ELEMENTS)


def cached(fn, *, device: torch.device, key: tuple = (), **constants):
    """``fn`` compiled with ``constants`` bound to its keyword-only parameters, once per process and
    (fn, device type, key, constants). Call it with the positional arguments only."""
    cache_key = (fn.__module__, fn.__qualname__, device.type, key, tuple(sorted(constants.items())))
    entry = _CACHE.get(cache_key)
    if entry is None:
        entry = _CACHE[cache_key] = _Compiled(fn, constants)
    return entry


def maybe_compiled(fn, *, device: torch.device, elements: int, key: tuple = (), **constants):
    """``cached(fn, ...)`` where ``wanted(device, elements)``, else ``fn`` with the constants bound (eager)."""
    if not wanted(device, elements):
        return functools.partial(fn, **constants)
    return cached(fn, device=device, key=key, **constants)


def _own_code_copy(fn, constants):
    """A new function object running a copy of ``fn``'s code, with ``constants`` as keyword defaults.

    dynamo keeps compiled graphs (and counts recompiles) per code object; a copy per key keeps every key
    at exactly one graph. The constants are defaults of the copy, not arguments, so a call passes tensors
    only and dynamo guards on the constants of this one copy, which never change."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **constants}
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy


class _Compiled:
    """Compiled copies of one function with its constants: one per *variant* of the call, i.e. whether
    inference mode is on and which tensor arguments are inference tensors (dynamo guards on their
    dispatch keys: a teacher computed under ``torch.inference_mode()`` next to ordinary student logits
    would otherwise recompile the graph). If compiling fails it warns once, runs this call eagerly and
    turns compiling off for the rest of the process (``wanted`` is False from then on). Calls run under
    ``no_grad``, with tensors that do not require grad (the caller detaches them)."""

    def __init__(self, fn, constants):
        self.fn, self.constants = fn, constants
        self.eager = functools.partial(fn, **constants)
        self.variants = {}      # variant -> compiled function that has run once
        self.failed = False

    @property
    def ready(self):
        """Whether a compiled copy has run (tests)."""
        return bool(self.variants) and not self.failed

    def __call__(self, *args):
        tensors = list(_tensors(args))
        if self.failed or any(size < 2 for t in tensors for size in t.shape):
            return self.eager(*args)
        variant = (torch.is_inference_mode_enabled(), *(t.is_inference() for t in tensors))
        compiled = self.variants.get(variant)
        if compiled is not None:
            with torch.no_grad():
                return compiled(*args)
        compiled = torch.compile(_own_code_copy(self.fn, self.constants), backend=BACKEND, dynamic=True,
                                 fullgraph=True)
        try:
            # the constants are fixed per copy: float ones are specialised (traced as constants) instead
            # of lifted to graph inputs, which would cost dynamo a second tracing pass
            with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True):
                out = compiled(*args)
        except Exception as e:  # compile-time failure: no C++ compiler, an unsupported device or op
            global _BROKEN
            self.failed = _BROKEN = True
            cause = getattr(e, "inner_exception", None) or e   # dynamo wraps the backend's error
            message = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
            warnings.warn(f"sdar_kernels: torch.compile of {self.fn.__qualname__} failed "
                          f"({type(cause).__name__}: {message}); running eagerly from now on (set {ENV}=0 to "
                          f"skip compiling)", RuntimeWarning, stacklevel=2)
            return self.eager(*args)
        self.variants[variant] = compiled
        return out


def _tensors(args):
    """The tensor arguments, and the tensors of dict arguments, in order."""
    for a in args:
        for t in (a.values() if isinstance(a, dict) else (a,)):
            if isinstance(t, torch.Tensor):
                yield t


def clear_cache():
    """Forget every compiled function of this process and any earlier compile failure (tests; dynamo's
    own caches are left alone)."""
    global _BROKEN
    _CACHE.clear()
    _BROKEN = False
