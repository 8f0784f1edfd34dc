"""fastdiff.optimize on denoising-diffusion-pytorch's own ``Unet`` (the PyPI package).

The package's ``denoising_diffusion_pytorch.py`` imports torchvision (no CPU build
here), accelerate and ema_pytorch at module level for its Trainer; the U-Net uses
none of them.  So only that module (and the ``attend`` / ``version`` modules it
imports) is loaded -- not the package ``__init__`` with its other diffusion variants
-- with the three Trainer-only imports stubbed where they are not installed.
scripts/setup.sh installs the package (``--no-deps``) with einops and ema-pytorch, and
release 1.11.1 (the last with GroupNorm blocks; 1.x also imports pytorch-fid, stubbed
likewise) into ``.cache/ddpm-1.11.1`` (``FASTDIFF_DDPM_1X`` overrides the folder).

Checked with the same round trip as tests/test_optimize.py (outputs, parameter
gradients, state_dict objects and keys, an optimizer built before ``optimize``,
``torch.compile(fullgraph=True)``, revert), and the transcription in
``_ddpm_unet.py`` that the other tests use is checked against the real module:
same state_dict keys, same outputs for the same weights (for 1.11.1: with its 1.x blocks,
the e2e benchmark's ``unet64`` model).
"""

import importlib
import importlib.util
import os
import pathlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastdiff._optimize import DDPMAttention, DDPMBlock, DDPMLinearAttention, DDPMRMSNorm

from test_optimize import DDPM_MODULE, RTOL, _cast, roundtrip

PACKAGE = "denoising_diffusion_pytorch"


def _stub(mp: pytest.MonkeyPatch, name: str, **attrs) -> None:
    """A stand-in module for a Trainer-only import that is not installed."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    mp.setitem(sys.modules, name, module)


# Release 1.11.1, the last whose Block normalises with nn.GroupNorm: scripts/setup.sh
# installs it (--no-deps) into this folder, beside the 2.x package in site-packages.
V1_ROOT = pathlib.Path(os.environ.get(
    "FASTDIFF_DDPM_1X", pathlib.Path(__file__).resolve().parent.parent / ".cache" / "ddpm-1.11.1"))
_SUBMODULES = ("attend", "version", "fid_evaluation", "denoising_diffusion_pytorch")


def _load_unet_module(package_dir: str):
    """The U-Net's module of the package in ``package_dir``, as DDPM_MODULE, without the
    package ``__init__``; yields it and then unloads it."""
    pytest.importorskip("einops")
    with pytest.MonkeyPatch.context() as mp:
        _stub(mp, "torchvision", transforms=types.SimpleNamespace(), utils=types.SimpleNamespace())
        _stub(mp, "accelerate", Accelerator=object)
        _stub(mp, "ema_pytorch", EMA=object)
        # 1.x imports its FID evaluator (pytorch-fid) at module level as well
        _stub(mp, "pytorch_fid")
        _stub(mp, "pytorch_fid.fid_score", calculate_frechet_distance=None)
        _stub(mp, "pytorch_fid.inception", InceptionV3=object)
        # the package without its __init__ (which imports every diffusion variant)
        package = types.ModuleType(PACKAGE)
        package.__path__ = [package_dir]
        mp.setitem(sys.modules, PACKAGE, package)
        for sub in _SUBMODULES:
            mp.delitem(sys.modules, f"{PACKAGE}.{sub}", raising=False)
        module = importlib.import_module(DDPM_MODULE)
        assert module.__file__.startswith(package_dir)
        yield module
        for sub in _SUBMODULES:
            sys.modules.pop(f"{PACKAGE}.{sub}", None)


@pytest.fixture(scope="module")
def real_ddpm():
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("denoising-diffusion-pytorch is not installed (scripts/setup.sh installs it)")
    yield from _load_unet_module(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def real_ddpm_v1():
    package_dir = V1_ROOT / PACKAGE
    if not (package_dir / "denoising_diffusion_pytorch.py").is_file():
        pytest.skip(f"denoising-diffusion-pytorch 1.11.1 is not in {V1_ROOT} (scripts/setup.sh puts it there)")
    yield from _load_unet_module(str(package_dir))


def _transcription():
    """tests/_ddpm_unet.py under a module name of its own."""
    path = __file__.replace("test_ddpm_package.py", "_ddpm_unet.py")
    spec = importlib.util.spec_from_file_location("_ddpm_transcription", path)
    transcription = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transcription)
    return transcription


def _small_unet(module, **kw):
    torch.manual_seed(0)
    return module.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, **kw)


def _roundtrip_small_unet(module, rms_norms: int):
    """optimize's round trip on the package's small U-Net: every Block, attention and
    RMSNorm patched (``rms_norms`` of them: 2.x's Blocks normalise with one), none skipped."""
    model = _small_unet(module)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    report = roundtrip(model, lambda m: m(*_cast(m, x, t)),
                       {DDPMBlock.kind: 22, DDPMAttention.kind: 3, DDPMLinearAttention.kind: 2,
                        DDPMRMSNorm.kind: rms_norms},
                       compile_backend="aot_eager")
    assert report.skipped == {}
    assert "mid_attn" in report.patched[DDPMAttention.kind]
    return model


def test_optimize_the_package_unet(real_ddpm):
    _roundtrip_small_unet(real_ddpm, rms_norms=29)


def test_optimize_the_package_unet_with_flash_attend(real_ddpm):
    """flash=True only makes the package's Attend pick SDPA; the swapped module keeps it."""
    model = _small_unet(real_ddpm, flash_attn=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    expected = model(x, t)
    import fastdiff

    fastdiff.optimize(model)
    assert model.fastdiff_report.counts[DDPMAttention.kind] == 3
    torch.testing.assert_close(model(x, t), expected, rtol=RTOL, atol=1e-5)


def test_the_transcription_matches_the_package(real_ddpm):
    """tests/_ddpm_unet.py (what the other tests optimize) computes what the package
    computes, with the same state_dict keys."""
    transcription = _transcription()
    real = _small_unet(real_ddpm)
    ours = _small_unet(transcription)
    assert list(ours.state_dict()) == list(real.state_dict())
    ours.load_state_dict(real.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), real(x, t), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Release 1.11.1 (GroupNorm blocks; the e2e benchmark's unet64 rows)
# --------------------------------------------------------------------------


def test_optimize_the_1x_package_unet(real_ddpm_v1):
    assert real_ddpm_v1.__file__.startswith(str(V1_ROOT))
    model = _roundtrip_small_unet(real_ddpm_v1, rms_norms=7)
    assert type(model.downs[0][0].block1.norm) is torch.nn.GroupNorm  # the 1.x Block


def test_1x_rms_norm_fuses_and_keeps_the_library_line_where_it_must(real_ddpm_v1, monkeypatch):
    """1.x's RMSNorm has no ``scale``: sqrt(C) comes from x.  Fused for x of g's dtype;
    a float64 x (promoted by the library's x * g) runs the library's line."""
    import fastdiff
    from fastdiff import _optimize

    torch.manual_seed(0)
    norm = real_ddpm_v1.RMSNorm(6)
    assert "scale" not in norm.__dict__
    with torch.no_grad():
        norm.g.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 5, 3)
    expected, expected64 = norm(x), norm(x.double())
    holder = torch.nn.Sequential(norm)
    fastdiff.optimize(holder)
    assert holder.fastdiff_report.counts == {DDPMRMSNorm.kind: 1}
    calls = []
    fused = _optimize.rms_norm_silu
    monkeypatch.setattr(_optimize, "rms_norm_silu", lambda *a, **k: calls.append(a[0].dtype) or fused(*a, **k))
    got, got64 = norm(x), norm(x.double())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got64.dtype == torch.float64 and torch.equal(got64, expected64)
    assert calls == [torch.float32]  # the fp32 call fused, the float64 one did not
    fastdiff.revert(holder)
    assert "forward" not in norm.__dict__


def test_an_rms_norm_with_another_forward_is_skipped(real_ddpm_v1):
    """Matched by module and class name; a forward that is neither release's is left alone."""
    import fastdiff

    class RMSNorm(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.g = torch.nn.Parameter(torch.ones(1, dim, 1, 1))

        def forward(self, x):
            return F.normalize(x, dim=1) * self.g

    RMSNorm.__module__ = DDPM_MODULE
    holder = torch.nn.Sequential(RMSNorm(4))
    fastdiff.optimize(holder)
    assert holder.fastdiff_report.counts == {}
    [(path, reason)] = holder.fastdiff_report.skipped[DDPMRMSNorm.kind]
    assert path == "0" and "1.x: from x" in reason


def test_the_1x_transcription_matches_the_package(real_ddpm_v1):
    """tests/_ddpm_unet.py with v1_blocks() (the e2e benchmark's 1.x U-Net) computes what
    the 1.11.1 package computes, with the same state_dict keys."""
    transcription = _transcription()
    real = _small_unet(real_ddpm_v1)
    ours = _small_unet(transcription, resnet_block=transcription.v1_blocks()[1])
    assert list(ours.state_dict()) == list(real.state_dict())
    ours.load_state_dict(real.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), real(x, t), rtol=1e-5, atol=1e-6)
