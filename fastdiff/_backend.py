"""Backend discovery and dispatch.

Four backends implement fastdiff's ops:

* ``triton`` -- Triton kernels, for CUDA tensors (and for CPU tensors when
  ``TRITON_INTERPRET=1``, which is how CI tests them; never chosen automatically
  for CPU tensors because the interpreter is slow).
* ``cuda``   -- CUDA C++ kernels of ``fastdiff._C`` built with CUDA.
* ``cpu``    -- C++ CPU kernels of ``fastdiff._C``.
* ``torch``  -- the plain-torch reference: the specification, and the fallback.

Each op declares, per backend, a function ``reasons(inputs) -> list[str]`` that
says why that backend cannot take these inputs (empty list: it can), in the
manner of xformers' ``not_supported_reasons``.  :func:`select` walks the
priority list for the inputs' device and takes the first backend with no
reasons; a backend forced with ``FASTDIFF_BACKEND`` or :func:`use_backend`
that cannot take the inputs raises :class:`BackendNotSupportedError` naming
the backend and every reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

__all__ = [
    "BACKENDS",
    "BackendNotSupportedError",
    "Impl",
    "backends",
    "current_backend",
    "select",
    "use_backend",
]

BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpu", "torch")

# Automatic choice, fastest first, per device type of the inputs.
_PRIORITY: Mapping[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fastdiff_backend", default=None
)


class BackendNotSupportedError(RuntimeError):
    """A forced backend cannot run an op on the given inputs (or none can)."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"{source}: unknown fastdiff backend {name!r}; valid names are "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    return name


def triton_interpret() -> bool:
    """True when Triton runs in interpreter mode (kernels execute on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_missing() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    except Exception as e:  # a broken install only removes the backend
        return f"import triton failed: {e}"
    return None


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled ``fastdiff._C`` module, or None when it was not built."""
    try:
        from fastdiff import _C
    except ImportError:
        return None
    return _C


def _extension_missing() -> Optional[str]:
    if extension() is None:
        return (
            "fastdiff._C is not built (run `pip install --no-build-isolation -e .` "
            "in the source tree)"
        )
    return None


def _why_unavailable(name: str) -> Optional[str]:
    """None if the backend can run on this machine, else the reason it cannot."""
    return _why_unavailable_cached(name, triton_interpret())


@functools.lru_cache(maxsize=None)
def _why_unavailable_cached(name: str, interpret: bool) -> Optional[str]:
    # Cached: the answer depends only on what is installed, the devices and
    # TRITON_INTERPRET (part of the key); dispatch asks on every op call.
    if name == "torch":
        return None
    if name == "triton":
        missing = _triton_missing()
        if missing:
            return missing
        if not torch.cuda.is_available() and not interpret:
            return "no CUDA device (and TRITON_INTERPRET is not set)"
        return None
    missing = _extension_missing()
    if missing:
        return missing
    if name == "cuda":
        if not extension().has_cuda():
            return "fastdiff._C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


def backends() -> dict[str, Optional[str]]:
    """Every backend name mapped to None when available, or to why it is not.

    >>> fastdiff.backends()
    {'triton': 'no CUDA device ...', 'cuda': '...', 'cpu': None, 'torch': None}
    """
    return {name: _why_unavailable(name) for name in BACKENDS}


def current_backend() -> Optional[str]:
    """The forced backend (``use_backend`` first, then ``FASTDIFF_BACKEND``), or None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("FASTDIFF_BACKEND", "")
    if env in ("", "auto"):
        return None
    return _check_name(env, "FASTDIFF_BACKEND")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every fastdiff op inside the block onto backend ``name``.

    ``None`` or ``"auto"`` restores automatic choice.  The setting is a context
    variable: it is local to the thread / task that entered the block.
    """
    if name == "auto":
        name = None
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def remember_backend(ctx) -> None:
    """Record the backend forced by :func:`use_backend` on an autograd ``ctx``.

    Autograd runs CUDA backwards on its own device thread, where the forward
    thread's context variable is unset: without this, ``backward()`` inside a
    ``use_backend`` block would pick its backend automatically.
    """
    ctx.fastdiff_backend = current_backend()


def backend_of(ctx) -> contextlib.AbstractContextManager:
    """``use_backend`` with the backend :func:`remember_backend` recorded."""
    return use_backend(getattr(ctx, "fastdiff_backend", None))


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``reasons(**inputs)`` lists why the backend cannot take the inputs (empty:
    it can); it is only asked after the backend is known to be available on
    this machine.  ``run(**inputs)`` computes the op.
    """

    backend: str
    run: Callable[..., object]
    reasons: Callable[..., list[str]] = lambda **_: []


def extension_has(symbol: str) -> Callable[..., list[str]]:
    """A ``reasons`` function for extension backends: the built ``fastdiff._C``
    must export ``symbol`` (an older build may predate the op)."""

    def reasons(**_) -> list[str]:
        ext = extension()
        if ext is not None and not hasattr(ext, symbol):
            return [f"fastdiff._C has no {symbol} (rebuild: pip install --no-build-isolation -e .)"]
        return []

    return reasons


def device_reasons(backend: str, device: torch.device) -> list[str]:
    """The device rule shared by every op: which devices each backend takes."""
    if backend == "cpu" and device.type != "cpu":
        return [f"tensors are on {device}; the cpu backend takes CPU tensors"]
    if backend == "cuda" and device.type != "cuda":
        return [f"tensors are on {device}; the cuda backend takes CUDA tensors"]
    if backend == "triton" and device.type != "cuda":
        if not (device.type == "cpu" and triton_interpret()):
            return [
                f"tensors are on {device}; the triton backend takes CUDA tensors "
                "(CPU tensors only with TRITON_INTERPRET=1)"
            ]
    return []


def select(op: str, impls: Sequence[Impl], device: torch.device, inputs: dict) -> Impl:
    """Pick the implementation of ``op`` that runs ``inputs`` on ``device``."""
    by_name = {impl.backend: impl for impl in impls}

    def why_not(name: str) -> list[str]:
        if name not in by_name:
            return [f"{op} has no {name} implementation"]
        unavailable = _why_unavailable(name)
        if unavailable:
            return [unavailable]
        return device_reasons(name, device) + by_name[name].reasons(**inputs)

    forced = current_backend()
    if forced is not None:
        reasons = why_not(forced)
        if reasons:
            raise BackendNotSupportedError(
                f"fastdiff backend {forced!r} cannot run {op}: " + "; ".join(reasons)
            )
        return by_name[forced]

    tried = []
    for name in _PRIORITY.get(device.type, ("torch",)):
        reasons = why_not(name)
        if not reasons:
            return by_name[name]
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(
        f"no fastdiff backend can run {op} on {device}: " + " | ".join(tried)
    )
