"""Backend discovery, forcing and the reasons a backend gives."""

import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import BackendNotSupportedError, _backend, use_backend
from fastdiff.ops import NUM_COEFS, sampler_step


def test_backends_lists_every_name_with_a_reason_or_none():
    status = fastdiff.backends()
    assert list(status) == ["triton", "cuda", "cpu", "torch"]
    assert status["torch"] is None
    for name, why in status.items():
        assert why is None or (isinstance(why, str) and why), name
    if not torch.cuda.is_available():
        assert status["cuda"] is not None


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    assert _backend.current_backend() is None
    with use_backend("torch"):
        assert _backend.current_backend() == "torch"
        with use_backend("auto"):
            assert _backend.current_backend() is None
        assert _backend.current_backend() == "torch"
    assert _backend.current_backend() is None


def test_unknown_names_raise_value_error_listing_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown fastdiff backend 'cudnn'; valid names are 'triton', 'cuda', 'cpu', 'torch'"):
        with use_backend("cudnn"):
            pass
    monkeypatch.setenv("FASTDIFF_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND: unknown fastdiff backend 'gpu'"):
        sampler_step(torch.zeros(1, 2), None, torch.zeros(1, NUM_COEFS))


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert _backend.current_backend() == "torch"
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError, match="fastdiff backend 'cuda' cannot run"):
        sampler_step(torch.zeros(1, 2), None, torch.zeros(1, NUM_COEFS))
    with use_backend("torch"):  # the context manager wins over the variable
        sampler_step(torch.zeros(1, 2), None, torch.zeros(1, NUM_COEFS))


def test_automatic_choice_prefers_compiled_cpu_kernels():
    impls = [_backend.Impl(name, run=lambda: name) for name in _backend.BACKENDS]
    chosen = _backend.select("op", impls, torch.device("cpu"), {})
    assert chosen.backend == ("cpu" if fastdiff.backends()["cpu"] is None else "torch")


def test_reasons_of_a_backend_are_reported():
    impls = [_backend.Impl("torch", run=None, reasons=lambda **_: ["head dim 7 is not supported"])]
    with use_backend("torch"):
        with pytest.raises(BackendNotSupportedError, match="head dim 7 is not supported"):
            _backend.select("fastdiff::demo", impls, torch.device("cpu"), {})
    with pytest.raises(BackendNotSupportedError, match=r"no fastdiff backend can run fastdiff::demo on cpu: cpu: .*torch: head dim 7"):
        _backend.select("fastdiff::demo", impls, torch.device("cpu"), {})


def test_import_needs_neither_triton_nor_the_extension():
    """With triton and fastdiff._C hidden, import works and the torch backend runs."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.') or name == 'fastdiff._C':\n"
        "            raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, fastdiff\n"
        "b = fastdiff.backends()\n"
        "assert b['cpu'] and b['triton'] and b['torch'] is None, b\n"
        "out = fastdiff.ops.ddpm_step(torch.zeros(2, 3), 5, torch.zeros(2, 3), torch.linspace(0.9, 0.1, 10))\n"
        "print('ok', tuple(out.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok (2, 3)" in res.stdout


@pytest.mark.parametrize("op, forced", [("group_norm_silu", "torch"), ("rms_norm_silu", "torch"),
                                        ("attention", "triton"), ("linear_attention", "triton")])
def test_backward_on_another_thread_keeps_the_forced_backend(monkeypatch, op, forced):
    """Autograd runs CUDA backwards on its device thread, where use_backend's
    context variable is unset: the backward must use the forward's backend."""
    import threading

    chosen = []
    real_select = _backend.select

    def spy(name, impls, device, inputs):
        impl = real_select(name, impls, device, inputs)
        chosen.append((name, impl.backend))
        return impl

    monkeypatch.setattr(_backend, "select", spy)
    call = {
        "group_norm_silu": lambda x: fastdiff.ops.group_norm_silu(x, 2),
        "rms_norm_silu": lambda x: fastdiff.ops.rms_norm_silu(x),
        "attention": lambda x: fastdiff.ops.attention(x, x, x),
        "linear_attention": lambda x: fastdiff.ops.linear_attention(x, x, x),
    }[op]
    if forced == "triton" and not (torch.cuda.is_available() or _backend.triton_interpret()):
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    x = torch.randn(2, 4, 6, 16, device="cuda" if torch.cuda.is_available() else "cpu",
                    requires_grad=True)
    with use_backend(forced):
        out = call(x)
    thread = threading.Thread(target=lambda: out.sum().backward())
    thread.start()
    thread.join()
    assert x.grad is not None
    backward = [b for name, b in chosen if name.endswith("_backward")]
    assert backward == [forced], chosen
