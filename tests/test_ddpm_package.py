"""fastdiff.optimize on denoising-diffusion-pytorch's own ``Unet`` (the PyPI package).

The package's ``denoising_diffusion_pytorch.py`` imports torchvision (no CPU build
here), accelerate and ema_pytorch at module level for its Trainer; the U-Net uses
none of them.  So only that module (and the ``attend`` / ``version`` modules it
imports) is loaded -- not the package ``__init__`` with its other diffusion variants
-- with the three Trainer-only imports stubbed where they are not installed.
scripts/setup.sh installs the package (``--no-deps``) with einops and ema-pytorch.

Checked with the same round trip as tests/test_optimize.py (outputs, parameter
gradients, state_dict objects and keys, an optimizer built before ``optimize``,
``torch.compile(fullgraph=True)``, revert), and the transcription in
``_ddpm_unet.py`` that the other tests use is checked against the real module:
same state_dict keys, same outputs for the same weights.
"""

import importlib
import importlib.util
import sys
import types

import pytest
import torch

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


@pytest.fixture(scope="module")
def real_ddpm():
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("denoising-diffusion-pytorch is not installed (scripts/setup.sh installs it)")
    pytest.importorskip("einops")
    with pytest.MonkeyPatch.context() as mp:
        _stub(mp, "torchvision", transforms=types.SimpleNamespace(), utils=types.SimpleNamespace())
        _stub(mp, "accelerate", Accelerator=object)
        _stub(mp, "ema_pytorch", EMA=object)
        # the package without its __init__ (which imports every diffusion variant)
        package = types.ModuleType(PACKAGE)
        package.__path__ = list(spec.submodule_search_locations)
        mp.setitem(sys.modules, PACKAGE, package)
        for sub in ("attend", "version", "denoising_diffusion_pytorch"):
            mp.delitem(sys.modules, f"{PACKAGE}.{sub}", raising=False)
        module = importlib.import_module(DDPM_MODULE)
        assert module.__file__.startswith(package.__path__[0])
        yield module
        for sub in ("attend", "version", "denoising_diffusion_pytorch"):
            sys.modules.pop(f"{PACKAGE}.{sub}", None)


def _small_unet(module, **kw):
    torch.manual_seed(0)
    return module.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, **kw)


def test_optimize_the_package_unet(real_ddpm):
    model = _small_unet(real_ddpm)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    report = roundtrip(model, lambda m: m(*_cast(m, x, t)),
                       {DDPMBlock.kind: 22, DDPMAttention.kind: 3, DDPMLinearAttention.kind: 2,
                        DDPMRMSNorm.kind: 29},
                       compile_backend="aot_eager")
    assert report.skipped == {}
    assert "mid_attn" in report.patched[DDPMAttention.kind]


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
    path = __file__.replace("test_ddpm_package.py", "_ddpm_unet.py")
    spec = importlib.util.spec_from_file_location("_ddpm_transcription", path)
    transcription = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(transcription)
    real = _small_unet(real_ddpm)
    ours = _small_unet(transcription)
    assert list(ours.state_dict()) == list(real.state_dict())
    ours.load_state_dict(real.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), real(x, t), rtol=1e-5, atol=1e-6)
