"""The eager fast path (``_backend.eager_fast_path``): a public op whose call
needs no autograd graph and runs under no tracing runs its body directly,
skipping torch.ops.fastdiff.* (dispatcher + custom-op autograd wrapper).

Checked per op: both paths give bit-identical outputs (and gradients), the
fast path is taken under no_grad / inference_mode and in eager backward, the
dispatcher is taken when grad is needed, under torch.compile, for FakeTensor
and tensor-subclass inputs and inside functorch / forward-AD, and bad input
raises the same error on both paths.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import fastdiff
from fastdiff import _backend, use_backend
from fastdiff.ops import NUM_COEFS, steps

BACKENDS = ["auto", "torch"]


def _inputs(op, requires_grad=False):
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=requires_grad):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    if op == "sampler_step":
        coefs = torch.randn(10, NUM_COEFS, generator=g)
        return dict(x=r(2, 4, 5, 5), model_output=r(2, 4, 5, 5), coefs=coefs,
                    index=torch.tensor([3, 7]), noise=r(2, 4, 5, 5))
    if op == "group_norm_silu":
        return dict(x=r(2, 8, 5, 3), weight=r(8), bias=r(8), emb=r(2, 8), scale=r(2, 8), shift=r(2, 8))
    if op == "rms_norm_silu":
        return dict(x=r(2, 8, 5, 3), weight=r(8), scale=r(2, 8), shift=r(2, 8))
    if op == "attention":
        return dict(q=r(1, 2, 7, 16), k=r(1, 2, 9, 16), v=r(1, 2, 9, 16))
    if op == "linear_attention":
        return dict(q=r(1, 2, 8, 7), k=r(1, 2, 8, 9), v=r(1, 2, 6, 9))
    raise AssertionError(op)


def _call(op, a):
    if op == "sampler_step":
        return fastdiff.ops.sampler_step(a["x"], a["model_output"], a["coefs"], a["index"],
                                         noise=a["noise"], clip_range=(-1.0, 1.0), return_x0=True)
    if op == "group_norm_silu":
        return fastdiff.ops.group_norm_silu(a["x"], 4, a["weight"], a["bias"], emb=a["emb"],
                                            scale=a["scale"], shift=a["shift"])
    if op == "rms_norm_silu":
        return fastdiff.ops.rms_norm_silu(a["x"], a["weight"], scale=a["scale"], shift=a["shift"])
    if op == "attention":
        return fastdiff.ops.attention(a["q"], a["k"], a["v"])
    return fastdiff.ops.linear_attention(a["q"], a["k"], a["v"])


OPS = ["sampler_step", "group_norm_silu", "rms_norm_silu", "attention", "linear_attention"]
BACKWARD_OPS = {"group_norm_silu", "rms_norm_silu", "attention", "linear_attention"}
# Ops whose eager training path on CPU (auto backend) records a C++ autograd node
# instead of the Python one: one fastdiff._C call (the struct in
# csrc/bindings.cpp), or SDPA's CPU flash op with torch's own autograd.
CPP_NODES = {"group_norm_silu": "GroupNormSiluEager", "rms_norm_silu": "RmsNormSiluEager"}
NATIVE_NODES = {**CPP_NODES, "attention": "ScaledDotProductFlashAttentionForCpuBackward0"}
_NO_DOUBLE_BACKWARD = {"attention": "derivative for .* is not implemented"}


def _outputs(res):
    return list(res) if isinstance(res, tuple) else [res]


def _same(a, b):
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.fixture
def dispatcher_calls(monkeypatch):
    """Counts calls of torch.ops.fastdiff.<name> (the dispatcher path)."""
    calls = []
    ns = torch.ops.fastdiff
    for name in [*OPS, *(f"{op}_backward" for op in BACKWARD_OPS)]:
        packet = getattr(ns, name)

        def spy(*args, _packet=packet, _name=name, **kwargs):
            calls.append(_name)
            return _packet(*args, **kwargs)

        monkeypatch.setattr(ns, name, spy)
    return calls


def _backend_ctx(backend):
    return contextlib.nullcontext() if backend == "auto" else use_backend(backend)


# --------------------------------------------------------------------------
# Same numbers on both paths
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_fast_and_dispatcher_paths_are_bit_identical(op, backend, dispatcher_calls):
    a = _inputs(op)
    with _backend_ctx(backend), torch.no_grad():
        fast = _call(op, a)
        assert dispatcher_calls == []  # the fast path was taken
        with _backend.force_dispatcher():
            slow = _call(op, a)
        assert dispatcher_calls == [op]
    _same(fast, slow)


@pytest.mark.parametrize("op", OPS)
def test_fast_path_under_autocast_is_the_dispatchers(op, dispatcher_calls):
    """No grad under CPU autocast: the fast path computes what the registered op does
    (the op's own precision, autocast off inside), bit for bit."""
    a = _inputs(op)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _call(op, a)
        assert dispatcher_calls == []
        with _backend.force_dispatcher():
            slow = _call(op, a)
    _same(fast, slow)


@pytest.mark.parametrize("op", OPS)
def test_fast_path_under_inference_mode(op, dispatcher_calls):
    a = _inputs(op)
    with torch.inference_mode():
        fast = _call(op, a)
        with _backend.force_dispatcher():
            slow = _call(op, a)
    assert dispatcher_calls == [op]
    for t in _outputs(fast):
        assert t.is_inference()
    _same(fast, slow)


@pytest.mark.parametrize("op", OPS)
def test_fast_path_with_grad_mode_on_but_nothing_requiring_grad(op, dispatcher_calls):
    fast = _call(op, _inputs(op))
    assert dispatcher_calls == []
    for t in _outputs(fast):
        assert not t.requires_grad and t.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(BACKWARD_OPS))
def test_backward_gradients_are_bit_identical(op, backend, dispatcher_calls):
    """Grad needed: the eager forward runs in the lean autograd.Function and its
    backward calls the backward body directly; forced, both go through the dispatcher."""
    grads = []
    for force in (False, True):
        a = _inputs(op, requires_grad=True)
        ctx = _backend.force_dispatcher() if force else contextlib.nullcontext()
        with _backend_ctx(backend), ctx:
            out = _call(op, a)
            assert out.grad_fn is not None
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads.append([t.grad for t in a.values()])
    assert dispatcher_calls == [op, f"{op}_backward"]  # only when forced
    for g_fast, g_slow in zip(*grads):
        assert torch.equal(g_fast, g_slow)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(BACKWARD_OPS))
def test_autocast_and_checkpoint_see_the_same_op_on_both_paths(op, backend):
    """Under autocast (whatever it does to the body's inner torch ops) and under
    activation checkpointing (both flavours), the eager paths and the dispatcher
    give the same outputs and gradients."""
    from torch.utils.checkpoint import checkpoint

    def run(force, wrap):
        a = _inputs(op, requires_grad=True)
        ctx = _backend.force_dispatcher() if force else contextlib.nullcontext()
        with _backend_ctx(backend), ctx:
            out = wrap(lambda *t: _call(op, dict(zip(a, t))), *a.values())
            out.float().sum().backward()
        return [out.detach()] + [t.grad for t in a.values()]

    wraps = {
        "autocast": lambda f, *t: torch.autocast("cpu", dtype=torch.bfloat16)(f)(*t),
        "checkpoint": lambda f, *t: checkpoint(f, *t, use_reentrant=False),
        "checkpoint-reentrant": lambda f, *t: checkpoint(f, *t, use_reentrant=True),
    }
    for name, wrap in wraps.items():
        for fast, slow in zip(run(False, wrap), run(True, wrap), strict=True):
            assert torch.equal(fast, slow), name


@pytest.mark.parametrize("op", sorted(BACKWARD_OPS - set(NATIVE_NODES)))
def test_double_backward_keeps_the_dispatcher(op, dispatcher_calls):
    """create_graph=True records the backward op: it must go through the dispatcher
    (the forward ran in the eager autograd.Function)."""
    a = _inputs(op, requires_grad=True)
    out = _call(op, a)
    try:
        torch.autograd.grad(out.sum(), list(a.values()), create_graph=True)
    except RuntimeError:
        pass  # an op without a double backward may refuse; the path is what is checked
    assert dispatcher_calls == [f"{op}_backward"]


def test_sampler_step_grad_takes_the_eager_function_with_the_dispatchers_gradients(dispatcher_calls):
    """Both outputs (out and x0) are differentiable on the eager autograd path, and every
    input gradient equals the dispatcher path's."""
    results = []
    for force in (False, True):
        a = _inputs("sampler_step", requires_grad=True)
        ctx = _backend.force_dispatcher() if force else contextlib.nullcontext()
        with ctx:
            out, x0 = _call("sampler_step", a)
            assert out.requires_grad and x0.requires_grad
            (out.sum() + 2 * x0.sum()).backward()
        results.append([out.detach(), x0.detach(), a["x"].grad, a["model_output"].grad,
                        a["noise"].grad])
        if not force:
            assert dispatcher_calls == []
            assert type(out.grad_fn).__name__.startswith("sampler_step_eager")
    assert dispatcher_calls == ["sampler_step"]
    for fast, slow in zip(*results, strict=True):
        assert fast is not None and torch.equal(fast, slow)


def test_steps_helpers_take_the_fast_path(dispatcher_calls):
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ac = torch.linspace(0.999, 0.01, 100, dtype=torch.float64)
    with torch.no_grad():
        fast = steps.ddim_step(m, torch.tensor([50, 50]), x, ac)
        with _backend.force_dispatcher():
            slow = steps.ddim_step(m, torch.tensor([50, 50]), x, ac)
    assert dispatcher_calls == ["sampler_step"]
    _same(fast, slow)


# --------------------------------------------------------------------------
# Where the fast path must not be taken
# --------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_grad_needed_takes_the_eager_autograd_function(op, dispatcher_calls):
    """Grad needed in eager mode: the op's body inside a plain autograd.Function (its
    statistics outputs non-differentiable)."""
    out = _outputs(_call(op, _inputs(op, requires_grad=True)))[0]
    assert dispatcher_calls == []
    if op in NATIVE_NODES:  # a C++ node on CPU tensors (auto backend)
        name = out.grad_fn.name()
        assert name == NATIVE_NODES[op] or name.endswith(f"{NATIVE_NODES[op]}>"), name
        if op == "attention":
            return  # the Python Function runs it on the triton backend (CUDA)
        with use_backend("torch"):  # the Python Function where the torch backend runs it
            out = _call(op, _inputs(op, requires_grad=True))
    assert type(out.grad_fn).__name__.startswith(f"{op}_eager")


@pytest.mark.parametrize("op", sorted(NATIVE_NODES))
def test_double_backward_through_the_native_node_raises(op, dispatcher_calls):
    """create_graph=True through the C++ node: the first-order gradients are the plain
    backward's, and differentiating them raises (never a silently missing term)."""
    a = _inputs(op, requires_grad=True)
    grads = torch.autograd.grad(_call(op, a).sum(), list(a.values()), create_graph=True)
    plain = torch.autograd.grad(_call(op, a).sum(), list(a.values()))
    for g, p in zip(grads, plain, strict=True):
        assert g.requires_grad and torch.equal(g, p)
    with pytest.raises(RuntimeError, match=_NO_DOUBLE_BACKWARD.get(op, f"fastdiff.{op}: no double backward")):
        sum(g.sum() for g in grads).backward()
    assert dispatcher_calls == []


_PRESENCE = [  # which optional inputs are given / require grad
    dict(given=("weight", "bias", "emb", "scale", "shift"), frozen=()),
    dict(given=("bias", "scale"), frozen=()),
    dict(given=("weight", "emb", "shift"), frozen=("x", "emb")),
    dict(given=(), frozen=()),
    dict(given=("weight", "bias", "emb", "scale", "shift"), frozen=("weight", "bias", "scale")),
]


@pytest.mark.parametrize("case", range(len(_PRESENCE)))
@pytest.mark.parametrize("op", sorted(CPP_NODES))
def test_cpp_node_gradients_with_absent_and_frozen_inputs(op, case):
    """The C++ node maps each present input to its autograd edge: with optional inputs
    left out and some not requiring grad, every gradient equals the dispatcher path's
    (and an input that does not require grad gets none), x contiguous and channels_last."""
    given, frozen = _PRESENCE[case]["given"], _PRESENCE[case]["frozen"]
    for channels_last in (False, True):
        grads = []
        for force in (False, True):
            a = {k: v for k, v in _inputs(op).items() if k == "x" or k in given}
            if channels_last:
                a["x"] = a["x"].contiguous(memory_format=torch.channels_last)
            for k, v in a.items():
                v.requires_grad_(k not in frozen)
            full = dict.fromkeys(("weight", "bias", "emb", "scale", "shift"))
            full.update(a)
            ctx = _backend.force_dispatcher() if force else contextlib.nullcontext()
            with ctx:
                if op == "group_norm_silu":
                    out = fastdiff.ops.group_norm_silu(full["x"], 4, full["weight"], full["bias"],
                                                       emb=full["emb"], scale=full["scale"],
                                                       shift=full["shift"])
                else:
                    out = fastdiff.ops.rms_norm_silu(full["x"], full["weight"], scale=full["scale"],
                                                     shift=full["shift"])
            if not force and any(v.requires_grad for v in a.values()):
                assert out.grad_fn.name().endswith(f"{CPP_NODES[op]}>")
            if out.requires_grad:
                out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
            grads.append({k: v.grad for k, v in a.items()})
            assert out.stride() == a["x"].stride()
        for k in grads[0]:
            if k in frozen:
                assert grads[0][k] is None and grads[1][k] is None
            else:
                assert grads[0][k].stride() == grads[1][k].stride(), k
                assert torch.equal(grads[0][k], grads[1][k]), k


def test_module_parameters_keep_the_fast_path(dispatcher_calls):
    """nn.Parameter weights (every module's) are plain tensors here: no dispatcher under
    no_grad, and the backward of a training step skips it too."""
    norm = fastdiff.nn.GroupNorm(4, 8, act="silu")
    x = torch.randn(2, 8, 5)
    with torch.no_grad():
        y = norm(x)
    assert dispatcher_calls == []
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 4, norm.weight, norm.bias)))
    norm(x.requires_grad_()).sum().backward()
    assert dispatcher_calls == []
    assert norm.weight.grad is not None


@pytest.mark.parametrize("op", OPS)
def test_tensor_subclass_takes_the_dispatcher(op, dispatcher_calls):
    class Sub(torch.Tensor):
        pass

    a = _inputs(op)
    first = next(iter(a))
    a[first] = a[first].as_subclass(Sub)
    with torch.no_grad():
        _call(op, a)
    assert dispatcher_calls and set(dispatcher_calls) == {op}


@pytest.mark.parametrize("op", OPS)
def test_fake_tensors_take_the_dispatcher(op, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    # The fake impl, not the body, must answer: a body call would be the fast path.
    import importlib

    module = importlib.import_module("fastdiff.ops." + op.replace("_silu", ""))
    body = "_sampler_step" if op == "sampler_step" else "_forward"

    def boom(*args, **kwargs):
        raise AssertionError("the op body ran on fake tensors")

    monkeypatch.setattr(module, body, boom)
    a = _inputs(op)
    with FakeTensorMode() as mode, torch.no_grad():
        fake = {k: mode.from_tensor(v) for k, v in a.items()}
        out = _outputs(_call(op, fake))[0]
    assert isinstance(out, FakeTensor)


@pytest.mark.parametrize("op", OPS)
def test_torch_compile_sees_the_custom_op(op):
    """Under dynamo the fast path is off: the graph holds fastdiff::<op>, with
    no graph break (fullgraph=True), under no_grad too."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    a = _inputs(op)
    torch._dynamo.reset()
    fn = torch.compile(lambda a: _call(op, a), backend=backend, fullgraph=True)
    with torch.no_grad():
        out = fn(a)
        ref = _call(op, a)
    _same(out, ref)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any(t.startswith(f"fastdiff.{op}") for t in targets), targets


def test_functorch_and_forward_ad_disable_the_fast_path():
    x = torch.randn(3, 4)
    seen = []

    def f(t):
        seen.append(_backend.eager_fast_path(t))
        return t * 2

    torch.func.vmap(f)(x)
    assert seen == [False]
    with torch.no_grad():
        assert _backend.eager_fast_path(x)
        with forward_ad.dual_level():
            assert not _backend.eager_fast_path(x)
        with _backend.force_dispatcher():
            assert not _backend.eager_fast_path(x)


def test_modes_disable_the_fast_path():
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class F(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class D(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.randn(3)
    with torch.no_grad():
        assert _backend.eager_fast_path(x, None)
        with F():
            assert not _backend.eager_fast_path(x)
        with D():
            assert not _backend.eager_fast_path(x)
        assert _backend.eager_fast_path(x.requires_grad_())  # no_grad: no graph, still fast
    assert not _backend.eager_fast_path(x)  # grad on and x requires grad


@pytest.mark.parametrize("op", OPS)
def test_default_device_keeps_the_fast_path(op, monkeypatch):
    """torch.set_default_device / `with torch.device(...)` (a torch-function mode that only
    fills in factory calls' device) keeps the fast path, with the same numbers; another
    mode stacked on it does not."""
    from torch.overrides import TorchFunctionMode

    class Other(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    a = _inputs(op)
    with torch.no_grad():
        ref = _call(op, a)
    bodies = []
    real = _backend.eager_mode
    monkeypatch.setattr(_backend, "eager_mode", lambda *t: bodies.append(real(*t)) or bodies[-1])
    with torch.no_grad(), torch.device("cpu"):
        assert _backend.eager_fast_path(a[next(iter(a))])
        out = _call(op, a)
        with Other():
            assert not _backend.eager_fast_path(a[next(iter(a))])
    _same(out, ref)
    assert "body" in bodies


def test_function_mode_sees_the_op_as_one_call():
    from torch.overrides import TorchFunctionMode

    seen = []

    class Log(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad(), Log():
        fastdiff.ops.rms_norm_silu(x)
    assert any("fastdiff.rms_norm_silu" in s for s in seen), seen


# --------------------------------------------------------------------------
# Errors are the same on both paths
# --------------------------------------------------------------------------


def _bad_calls():
    x, m = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    c = torch.randn(5, NUM_COEFS)
    yield "sampler_step index range", lambda: fastdiff.ops.sampler_step(x, m, c, torch.tensor([0, 5]))
    yield "sampler_step coefs shape", lambda: fastdiff.ops.sampler_step(x, m, torch.randn(5, 4))
    yield "sampler_step model_output shape", lambda: fastdiff.ops.sampler_step(x, m[:1], c[:1])
    yield "sampler_step clip", lambda: fastdiff.ops.sampler_step(x, m, c[:1], clip_range=(1.0, -1.0))
    yield "sampler_step noise+seed", lambda: fastdiff.ops.sampler_step(x, m, c[:1], noise=x, seed=1)
    xg = torch.randn(2, 8, 3, 3)
    yield "group_norm groups", lambda: fastdiff.ops.group_norm_silu(xg, 3)
    yield "group_norm weight", lambda: fastdiff.ops.group_norm_silu(xg, 4, torch.randn(7))
    yield "rms_norm act", lambda: fastdiff.ops.rms_norm_silu(xg, act="gelu")
    yield "rms_norm scale", lambda: fastdiff.ops.rms_norm_silu(xg, scale=torch.randn(8))
    q = torch.randn(1, 2, 4, 8)
    yield "attention head dim", lambda: fastdiff.ops.attention(q, torch.randn(1, 2, 4, 7), q)
    yield "attention dtype", lambda: fastdiff.ops.attention(q, q.double(), q)
    yield "linear_attention shape", lambda: fastdiff.ops.linear_attention(q, q, torch.randn(1, 2, 4, 5))
    yield "forced backend", lambda: _forced_triton(q)


def _forced_triton(q):
    with use_backend("cuda"):
        return fastdiff.ops.group_norm_silu(torch.randn(2, 4, 3), 2)


@pytest.mark.parametrize("name, call", list(_bad_calls()), ids=[n for n, _ in _bad_calls()])
def test_errors_are_identical_on_both_paths(name, call):
    with torch.no_grad():
        with pytest.raises(Exception) as fast:
            call()
        with _backend.force_dispatcher(), pytest.raises(Exception) as slow:
            call()
    assert type(fast.value) is type(slow.value)
    assert str(fast.value) == str(slow.value)
    assert str(fast.value).strip()


@pytest.mark.parametrize("cols", [
    lambda a: dict(A_X=a.sqrt(), C_0=1 - a, C_N=a * 0),            # the stacked common case
    lambda a: dict(A_M=1.0, C_X=a),                                # a Python number: broadcast
    lambda a: dict(C_P=a[:1], C_Q=a.float()),                      # broadcast and a cast
])
def test_coefficient_rows_are_those_of_the_column_writes(cols):
    """steps._rows stacks the columns instead of writing each into a zero table:
    same bits (a reference built the old way), same layout."""
    a = torch.rand(5, dtype=torch.float64)
    c = cols(a)
    ref = torch.zeros(5, NUM_COEFS, dtype=a.dtype)
    for name, value in c.items():
        ref[..., steps._COLUMNS[name]] = value
    rows = steps._rows(a.shape, a, **c)
    assert rows.stride() == ref.stride() and rows.dtype == ref.dtype
    assert torch.equal(rows.view(torch.int64), ref.view(torch.int64))


@pytest.mark.parametrize("layout", ["dense", "bnhd", "qkv-unbind", "sliced", "column-strided"])
def test_attention_cpu_native_node_matches_the_registered_op(layout):
    """SDPA's CPU flash op with its own autograd (the eager training path on CPU) gives
    the registered op's o (values and strides) and gradients, bit for bit, for q / k / v
    of every layout the op takes."""
    g = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 3, 11, 8

    def inputs():
        if layout == "dense":
            return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
        if layout == "bnhd":
            return [torch.randn(B, N, H, D, generator=g).transpose(1, 2) for _ in range(3)]
        if layout == "qkv-unbind":  # views of a fused (B, N, 3, H, D) projection
            return list(torch.randn(B, N, 3, H, D, generator=g).permute(2, 0, 3, 1, 4).unbind(0))
        if layout == "sliced":  # every other position: not dense
            return [torch.randn(B, H, 2 * N, D, generator=g)[:, :, ::2] for _ in range(3)]
        return [torch.randn(B, H, D, N, generator=g).transpose(-1, -2) for _ in range(3)]

    results = []
    for force in (False, True):
        g.manual_seed(1)
        leaves = [t.detach().requires_grad_() for t in inputs()]
        ctx = _backend.force_dispatcher() if force else contextlib.nullcontext()
        with ctx:
            o = fastdiff.ops.attention(*leaves)
        if not force:  # SDPA's node, behind a copy into the op's layout for non-dense q
            node = o.grad_fn
            if node.name().endswith("CopyBackwards"):
                node = node.next_functions[1][0]
            assert node.name() == "ScaledDotProductFlashAttentionForCpuBackward0", node.name()
        o.backward(torch.linspace(-1, 1, o.numel()).reshape(o.shape))
        results.append([o.detach()] + [t.grad for t in leaves])
    for fast, slow in zip(*results, strict=True):
        assert fast.stride() == slow.stride()
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("op", sorted(NATIVE_NODES))
def test_native_node_detects_a_modified_saved_input(op):
    """The C++ nodes save their inputs through autograd's saved variables: an input
    modified in place after the forward makes the backward raise (never gradients
    from the modified values); retain_graph allows a second backward with the same
    gradients."""
    a = _inputs(op, requires_grad=True)
    out = _call(op, a)
    out.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in a.values()]
    for t in a.values():
        t.grad = None
    out.sum().backward()
    for t, g in zip(a.values(), first, strict=True):
        assert torch.equal(t.grad, g)
    a = _inputs(op, requires_grad=False)
    name = next(iter(a))
    for k, t in a.items():
        t.requires_grad_(k != name)  # the first input is saved but is not a leaf needing grad
    out = _call(op, a)
    with torch.no_grad():
        a[name].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
