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
    "eager_fast_path",
    "force_dispatcher",
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


def static_reasons(fn: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """Mark a ``reasons`` function whose answer does not depend on the inputs
    (nor change while the process runs): :func:`select` asks it once."""
    fn.fastdiff_static = True
    return fn


@static_reasons
def no_reasons(**_) -> list[str]:
    return []


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``reasons(**inputs)`` lists why the backend cannot take the inputs (empty:
    it can); it is only asked after the backend is known to be available on
    this machine.  ``run(**inputs)`` computes the op.  A ``reasons`` that
    ignores the inputs can be marked with :func:`static_reasons`.
    """

    backend: str
    run: Callable[..., object]
    reasons: Callable[..., list[str]] = no_reasons

    def __post_init__(self):
        if self.backend == "torch":
            object.__setattr__(self, "run", without_autocast(self.run))


def without_autocast(run: Callable[..., object]) -> Callable[..., object]:
    """``run`` with autocast off.  The torch backend computes in the op's own precision,
    as the kernels do: autocast (which also reaches inside a custom op's body) would
    otherwise cast the reference's matmuls and leave forward and backward in different
    dtypes.  Torch-op paths outside an ``Impl`` wrap themselves with it too."""
    any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)

    @functools.wraps(run)
    def wrapped(*args, **kwargs):
        if any_autocast is not None and not any_autocast():
            return run(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            return run(*args, **kwargs)

    return wrapped


def extension_has(symbol: str) -> Callable[..., list[str]]:
    """A ``reasons`` function for extension backends: the built ``fastdiff._C``
    must export ``symbol`` (an older build may predate the op)."""

    @static_reasons
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


# --------------------------------------------------------------------------
# The eager fast path
# --------------------------------------------------------------------------

_no_fast_path: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastdiff_no_fast_path", default=False
)


def _unknown() -> bool:  # a check this torch lacks: assume the worst (no fast path)
    return True


# torch._C functions, looked up once (each exists on torch 2.11 and 2.13; a
# torch without one loses the fast path, never correctness).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", _unknown)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", _unknown)
_function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", _unknown)
_jit_tracing = getattr(torch._C, "_get_tracing_state", None)
try:  # the mode of torch.set_default_device / `with torch.device(...)`
    from torch.overrides import _get_current_function_mode_stack as _function_mode_stack
    from torch.utils._device import DeviceContext as _DeviceContext
except ImportError:  # pragma: no cover
    _function_mode_stack = _DeviceContext = None
_is_grad_enabled = torch.is_grad_enabled
# nn.Parameter is a Tensor subclass without a __torch_function__ of its own:
# module weights must not cost the fast path.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

try:
    from torch.autograd import forward_ad as _forward_ad
except ImportError:  # pragma: no cover
    _forward_ad = None


def eager_mode(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """How an op may run eagerly, skipping ``torch.ops.fastdiff.*`` (the
    dispatcher and the custom-op autograd wrapper, ~20 µs of host time per call
    on CPU, more on the autograd path):

    * ``"body"``: run the implementation directly -- no autograd graph is
      needed (grad mode off, or no input requires grad);
    * ``"autograd"``: run it inside a plain ``torch.autograd.Function`` with the
      op's own setup_context / backward (see :class:`EagerOp`);
    * ``None``: go through the dispatcher.

    Pass every tensor argument of the op (None for absent optional ones).  The
    dispatcher is skipped only when going through it could not make a difference:

    * nothing is tracing: not torch.compile / export (dynamo), no TorchScript
      trace, no torch-dispatch mode and no torch-function mode (make_fx,
      FakeTensorMode, FlopCounterMode, ... see the custom op as one node) but
      torch's default-device mode (``torch.set_default_device``, ``with
      torch.device(...)``), which only fills in ``device=`` of factory calls
      and acts on the op's body alike on both paths;
    * no functorch transform (vmap, grad, jvp) is active;
    * every tensor is exactly ``torch.Tensor`` or ``nn.Parameter``: no other
      subclass (FakeTensor, DTensor, ...); anything else goes to the
      dispatcher, which also gives the error for a non-tensor argument;
    * no forward-AD level is open (dual tensors).

    The outputs are the same tensors the dispatcher path returns (the same
    body runs), and so are the gradients (the same backward runs).
    """
    # is_compiling() first: under dynamo it is constant True, so nothing
    # below is traced (no graph break under fullgraph=True).
    if torch.compiler.is_compiling() or _no_fast_path.get():
        return None
    if _dispatch_modes() or _functorch_active():
        return None
    if _function_modes() and not _only_device_modes():
        return None
    if _jit_tracing is None or _jit_tracing() is not None:
        return None
    if _forward_ad is None or _forward_ad._current_level >= 0:
        return None
    grad = _is_grad_enabled()
    mode = "body"
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSORS:
            return None
        if grad and t.requires_grad:
            mode = "autograd"
    return mode


def _only_device_modes() -> bool:
    """Every active torch-function mode is a default-device one."""
    if _function_mode_stack is None:
        return False
    return all(type(m) is _DeviceContext for m in _function_mode_stack())


def eager_fast_path(*tensors: Optional[torch.Tensor]) -> bool:
    """True when an op may run its implementation directly (``eager_mode`` is "body")."""
    return eager_mode(*tensors) == "body"


def run_backward(ctx, name: str, body: Callable, *args):
    """An op's backward from its autograd ``backward``: under the backend the
    forward recorded (:func:`remember_backend`), the backward body directly when
    no graph is recorded over it (eager), else ``torch.ops.fastdiff.<name>``
    (create_graph, tracing)."""
    forced = getattr(ctx, "fastdiff_backend", None)
    # the context variable only when it differs (a block entered costs ~1 µs)
    with use_backend(forced) if forced != _forced.get() else contextlib.nullcontext():
        if eager_fast_path(*(a for a in args if isinstance(a, torch.Tensor))):
            return body(*args)
        return getattr(torch.ops.fastdiff, name)(*args)


class EagerOp:
    """Runs a registered op the cheapest way :func:`eager_mode` allows.

    ``forward(*args)`` is the op's body on validated inputs (returning the op's
    output tuple; its first ``differentiable`` outputs are differentiable, the
    others are saved statistics), ``setup_context`` / ``backward`` the functions
    given to ``register_autograd``.  The dispatcher path looks the op up in
    ``torch.ops.fastdiff`` at call time.
    """

    def __init__(self, name: str, forward: Callable, setup_context: Callable, backward: Callable,
                 differentiable: int = 1):
        self.name = name
        self.forward = forward

        # forward(ctx, *args) with setup_context called inside it (the
        # "combined" style): a Function with a separate setup_context pays
        # inspect.signature(forward).bind(...) on every apply (~18 µs on
        # CPU), and this path never runs under functorch transforms, the only
        # callers that need the separate one (eager_mode returns None there).
        def function_forward(ctx, *args):
            output = forward(*args)
            ctx.mark_non_differentiable(*output[differentiable:])
            setup_context(ctx, args, output)
            return output

        def function_backward(ctx, *grads):
            return backward(ctx, *grads)

        # built with type() so the graph node is named after the op (<name>_eagerBackward)
        self.function = type(f"{name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(function_forward),
            "backward": staticmethod(function_backward),
        })

    def __call__(self, tensors: Sequence[Optional[torch.Tensor]], *args):
        return self.run(eager_mode(*tensors), *args)

    def run(self, mode: Optional[str], *args):
        """The op by the path ``mode`` (:func:`eager_mode`'s answer for its tensors)."""
        if mode == "body":
            return self.forward(*args)
        if mode == "autograd":
            return self.function.apply(*args)
        return getattr(torch.ops.fastdiff, self.name)(*args)


@contextlib.contextmanager
def force_dispatcher() -> Iterator[None]:
    """Inside the block every op goes through ``torch.ops.fastdiff.*`` (for
    tests and benchmarks that compare the two paths)."""
    token = _no_fast_path.set(True)
    try:
        yield
    finally:
        _no_fast_path.reset(token)


# --------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------


def select(op: str, impls: Sequence[Impl], device: torch.device, inputs: dict) -> Impl:
    """Pick the implementation of ``op`` that runs ``inputs`` on ``device``.

    Every call of every op asks this, so the part of the answer that does not
    depend on the inputs (is the backend available, does it take this device,
    the reasons of :func:`static_reasons` functions) is worked out once per
    (impls, device, forced backend, TRITON_INTERPRET) and kept; only reasons
    that look at the inputs are asked per call.  Answers and messages are
    those of asking everything each time.
    """
    forced = current_backend()
    plan = _plan(op, impls, device, forced)
    if forced is not None:
        _, impl, reasons, dynamic = plan[0]
        if dynamic:
            reasons = reasons + impl.reasons(**inputs)
        if reasons:
            raise BackendNotSupportedError(
                f"fastdiff backend {forced!r} cannot run {op}: " + "; ".join(reasons)
            )
        return impl

    tried = []
    for name, impl, reasons, dynamic in plan:
        if dynamic:
            reasons = reasons + impl.reasons(**inputs)
        if not reasons:
            return impl
        tried.append(f"{name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(
        f"no fastdiff backend can run {op} on {device}: " + " | ".join(tried)
    )


# (id(impls), device, forced, interpret) -> (impls, plan); impls is kept so a
# recycled id of a freed tuple is never mistaken for it.
_plans: dict = {}


def _plan(op: str, impls: Sequence[Impl], device: torch.device, forced: Optional[str]) -> list:
    """[(name, impl, static reasons, ask impl.reasons per call?)] in the order
    :func:`select` tries them (just the forced backend when one is forced)."""
    # TRITON_INTERPRET only changes answers about the triton backend on
    # non-CUDA tensors, which it is only asked about when forced.
    key = (id(impls), device, forced, forced == "triton" and triton_interpret())
    hit = _plans.get(key)
    if hit is not None and hit[0] is impls:
        return hit[1]
    by_name = {impl.backend: impl for impl in impls}
    plan = []
    for name in (forced,) if forced is not None else _PRIORITY.get(device.type, ("torch",)):
        impl = by_name.get(name)
        if impl is None:
            plan.append((name, None, [f"{op} has no {name} implementation"], False))
            continue
        unavailable = _why_unavailable(name)
        if unavailable:
            plan.append((name, impl, [unavailable], False))
            continue
        reasons = device_reasons(name, device)
        dynamic = not getattr(impl.reasons, "fastdiff_static", False)
        if not dynamic:
            reasons = reasons + impl.reasons()
        plan.append((name, impl, reasons, dynamic))
    if isinstance(impls, tuple):  # lists may change in place: never kept
        _plans[key] = (impls, plan)
    return plan
