"""fastdiff.optimize / fastdiff.revert on tiny randomly initialised models.

For each model: outputs and parameter gradients match the unpatched copy (fp32,
1e-4 relative), parameters / state_dict entries are the very same objects under
the same keys, an optimizer built before ``optimize`` steps the live
parameters, ``torch.compile(fullgraph=True)`` traces without a graph break, the
report lists what changed, and ``revert`` brings back the same module objects,
forwards and processors (bitwise-identical outputs).  The denoising-diffusion-pytorch
U-Net here is the transcription in ``_ddpm_unet.py`` loaded under the package's module
name (it adds the 1.x GroupNorm blocks, which the installed 2.x package lacks);
tests/test_ddpm_package.py runs the same round trip on the package's own module and
checks the transcription against it.
"""

import copy
import importlib.util
import logging
import pathlib
import sys

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff._optimize import (
    DDPMAttention,
    DDPMBlock,
    DDPMLinearAttention,
    DDPMRMSNorm,
    DiffusersAttention,
    DiffusersResnetBlock2D,
    DiffusersUNetOutputHead,
    OptimizeReport,
    SequentialGroupNormSiLU,
    optimize,
    revert,
)
from fastdiff.testing import assert_close

RTOL = 1e-4
DDPM_MODULE = "denoising_diffusion_pytorch.denoising_diffusion_pytorch"


def _fastdiff_attention_modules():
    return pytest.importorskip("fastdiff.nn.attention", reason="fastdiff.nn.attention not available yet")


def _diffusers():
    pytest.importorskip("fastdiff.nn.diffusers_processor",
                        reason="fastdiff.nn.diffusers_processor not available yet")
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def ddpm():
    """The transcribed denoising-diffusion-pytorch module, registered under the package's name."""
    path = pathlib.Path(__file__).with_name("_ddpm_unet.py")
    spec = importlib.util.spec_from_file_location(DDPM_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, DDPM_MODULE, module)
        spec.loader.exec_module(module)
        yield module


def _is_clean(model: nn.Module) -> bool:
    """No fastdiff bookkeeping and no instance-level forward anywhere."""
    return not any(
        "forward" in m.__dict__ or any(k.startswith("_fastdiff") for k in m.__dict__)
        for m in model.modules()
    ) and not hasattr(model, "fastdiff_report")


def _cast(m: nn.Module, *tensors):
    """Floating-point inputs in the dtype of m's parameters (for the float64 copy)."""
    dtype = next(m.parameters()).dtype
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def _check_grad(name, got, expected, truth, model_scale):
    """Against the float64 truth, the fused model's gradient is within 1e-4 of the tensor's
    scale, or no worse than twice the unpatched fp32 model's error, or within 1e-6 of the
    model's largest gradient (gradients that cancel to ~0, e.g. a conv bias before a GroupNorm
    of one channel per group, are pure rounding)."""
    scale = truth.abs().max().item()
    err = (got.double() - truth).abs().max().item()
    ref_err = (expected.double() - truth).abs().max().item()
    bound = max(RTOL * scale, 2 * ref_err, 1e-6 * model_scale)
    assert err <= bound, (f"grad {name}: error {err:.3g} > {bound:.3g} "
                          f"(scale {scale:.3g}, fp32 ref error {ref_err:.3g})")


def roundtrip(model: nn.Module, run, kinds: dict, *, compile_backend="aot_eager") -> OptimizeReport:
    """Optimize ``model`` in place and check it against an unpatched copy; revert it at the end.

    ``run(m)`` returns the tensor output of ``m`` on fixed inputs; ``kinds`` is the
    expected ``report.counts``."""
    model.train()
    ref = copy.deepcopy(model)
    modules = list(model.modules())
    params = list(model.named_parameters())
    state = model.state_dict(keep_vars=True)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    assert optimize(model) is model
    report = model.fastdiff_report
    assert report.counts == kinds, str(report)

    # the same Parameter objects, under the same names and state_dict keys, in the same order
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    new_state = model.state_dict(keep_vars=True)
    assert list(new_state) == list(state)
    assert all(new_state[k] is v for k, v in state.items())
    model.load_state_dict(ref.state_dict())  # strict: checkpoints load

    # forward and backward match
    expected, got = run(ref), run(model)
    assert_close(got, expected, rtol=RTOL, name="output")
    grad_out = torch.randn_like(expected)
    (expected * grad_out).sum().backward()
    (got * grad_out).sum().backward()
    truth = copy.deepcopy(ref).double()
    truth.zero_grad()
    (run(truth) * grad_out.double()).sum().backward()
    model_scale = max(r.grad.abs().max().item() for r in truth.parameters() if r.grad is not None)
    for (name, p), q, r in zip(model.named_parameters(), ref.parameters(), truth.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            _check_grad(name, p.grad, q.grad, r.grad, model_scale)

    # an optimizer built before optimize() steps the parameters the fused model reads
    opt.step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert_close(run(model), run(ref), rtol=RTOL, name="output after a step")

    if compile_backend is not None:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        with torch.no_grad():
            assert_close(run(compiled), run(ref), rtol=RTOL, name="compiled output")

    # revert: the very same modules, forwards and processors; identical outputs
    model.load_state_dict(ref.state_dict())
    assert revert(model) is model
    assert _is_clean(model)
    after = list(model.modules())
    assert len(after) == len(modules) and all(a is b for a, b in zip(after, modules))
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    with torch.no_grad():
        assert torch.equal(run(model), run(ref))
    return report


# --------------------------------------------------------------------------
# nn.Sequential and fastdiff's own GroupNorm
# --------------------------------------------------------------------------


def _sequential_model():
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.GroupNorm(2, 8),                        # fused with the SiLU after it
        nn.SiLU(),
        nn.Conv2d(8, 8, 1),
        fastdiff.nn.GroupNorm(4, 8, act=None),     # fastdiff's own, act=None: fused too
        nn.SiLU(),
        nn.Sequential(nn.GroupNorm(2, 8, affine=False), nn.SiLU()),  # nested, no affine
        nn.GroupNorm(2, 8),                        # no SiLU after it: left alone
        nn.ReLU(),
        nn.Conv2d(8, 3, 1),
    )


def test_sequential_group_norm_silu():
    model = _sequential_model()
    x = torch.randn(2, 4, 6, 5)
    gn, act = model[1], model[2]
    report = roundtrip(model, lambda m: m(*_cast(m, x)), {SequentialGroupNormSiLU.kind: 2},
                       compile_backend="inductor")
    assert report.patched[SequentialGroupNormSiLU.kind] == ["", "6"]
    assert model[1] is gn and model[2] is act

    # the slots: a fused fastdiff GroupNorm holding the same Parameters, an Identity after it
    optimize(model)
    names = [type(c).__name__ for c in model]
    assert names[1:6] == ["GroupNorm", "Identity", "Conv2d", "GroupNorm", "Identity"]
    assert type(model[1]) is fastdiff.nn.GroupNorm and model[1].act == "silu"
    assert model[1].weight is gn.weight and model[1].bias is gn.bias and model[1].eps == gn.eps
    assert model[6][0].act == "silu" and model[6][0].weight is None and type(model[6][1]) is nn.Identity
    assert type(model[7]) is nn.GroupNorm and type(model[8]) is nn.ReLU


def test_root_and_unsupported_are_left_alone(ddpm):
    _fastdiff_attention_modules()
    hooked = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    hooked[1].register_forward_hook(lambda *a: None)
    optimize(hooked)
    assert type(hooked[0]) is nn.GroupNorm and type(hooked[1]) is nn.SiLU
    assert hooked.fastdiff_report.skipped[SequentialGroupNormSiLU.kind][0][1].startswith("hooks")

    attn = ddpm.Attention(8, heads=2, dim_head=4)  # a swap needs a parent
    optimize(attn)
    assert type(attn).__module__ == DDPM_MODULE
    (path, reason), = attn.fastdiff_report.skipped[DDPMAttention.kind]
    assert path == "" and "root" in reason
    x = torch.randn(1, 8, 4, 4)
    attn.attend.scale = 0.5  # a custom scale: not swapped
    holder = nn.ModuleList([attn])
    optimize(holder)
    assert holder[0] is attn and "scale" in holder.fastdiff_report.skipped[DDPMAttention.kind][0][1]
    assert attn(x).shape == x.shape


# --------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_diffusers_unet2d(time_embedding_norm):
    diffusers = _diffusers()
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        resnet_time_scale_shift=time_embedding_norm,
    )
    assert model.mid_block.resnets[0].time_embedding_norm == time_embedding_norm
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    report = roundtrip(
        model, lambda m: m(*_cast(m, x, t)).sample,
        {DiffusersResnetBlock2D.kind: 8, DiffusersAttention.kind: 4, DiffusersUNetOutputHead.kind: 1},
        compile_backend="aot_eager" if time_embedding_norm == "default" else "eager",
    )
    assert "mid_block.resnets.1" in report.patched[DiffusersResnetBlock2D.kind]
    assert "" in report.patched[DiffusersUNetOutputHead.kind]


def test_diffusers_unet2d_convolutions_see_contiguous_inputs():
    """diffusers' attention blocks hand channels_last on (each later convolution then
    copies its weight per call); after optimize every convolution of a contiguous
    UNet2DModel forward gets a contiguous input, and the output is the same."""
    diffusers = _diffusers()
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])

    def conv_inputs():
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
                 for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            out = model(x, t).sample
        for h in hooks:
            h.remove()
        return seen, out

    before, expected = conv_inputs()
    assert not all(before)  # what diffusers' own processor does
    fastdiff.optimize(model)
    after, got = conv_inputs()
    assert len(after) == len(before) and all(after)
    assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_diffusers_unet2d_condition():
    diffusers = _diffusers()
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    report = roundtrip(
        model, lambda m: m(*_cast(m, x, t, ctx)).sample,
        {DiffusersResnetBlock2D.kind: 8, DiffusersAttention.kind: 8, DiffusersUNetOutputHead.kind: 1},
        compile_backend="eager",
    )
    attn = report.patched[DiffusersAttention.kind]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in attn  # cross-attention


def test_diffusers_unsupported_resnet_and_processor():
    _diffusers()
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D

    class CustomProcessor(AttnProcessor2_0):
        pass

    model = nn.ModuleDict({
        "mish": ResnetBlock2D(in_channels=8, temb_channels=16, groups=2, non_linearity="mish"),
        "silu": ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=16, groups=2,
                              output_scale_factor=2.0, skip_time_act=True, down=True),
        "attn": Attention(8, heads=2, dim_head=4, processor=CustomProcessor()),
    })
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    ref = copy.deepcopy(model)
    proc = model["attn"].processor
    optimize(model)
    report = model.fastdiff_report
    assert report.patched == {DiffusersResnetBlock2D.kind: ["silu"]}
    assert "Mish" in dict(report.skipped[DiffusersResnetBlock2D.kind])["mish"]
    assert "CustomProcessor" in dict(report.skipped[DiffusersAttention.kind])["attn"]
    assert "forward" not in model["mish"].__dict__ and model["attn"].processor is proc
    for name in ("mish", "silu"):
        assert_close(model[name](x, temb), ref[name](x, temb), rtol=RTOL, name=name)
    # a temb the fused op cannot take as an (N, C) embedding runs the library's lines
    assert_close(model["silu"](x, temb[:1]), ref["silu"](x, temb[:1]), rtol=RTOL, name="broadcast temb")
    seq = x.flatten(2).transpose(1, 2)
    assert torch.equal(model["attn"](seq), ref["attn"](seq))
    revert(model)
    assert _is_clean(model)


def test_deepcopy_idempotence_and_verbose_log(caplog):
    diffusers = _diffusers()
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    with caplog.at_level(logging.INFO, logger="fastdiff.optimize"):
        optimize(model, verbose=True)
    kinds = {DiffusersResnetBlock2D.kind, DiffusersAttention.kind, DiffusersUNetOutputHead.kind}
    logged = [r.getMessage() for r in caplog.records if r.name == "fastdiff.optimize"]
    assert len(logged) == 3 and all(any(k in line for line in logged) for k in kinds)
    assert str(model.fastdiff_report).startswith("fastdiff.optimize: 13 module(s) patched")

    assert optimize(model).fastdiff_report.counts == {}  # already optimized: nothing new

    twin = copy.deepcopy(model)  # e.g. an EMA copy: its forwards are bound to itself
    block = twin.down_blocks[0].resnets[0]
    assert block.forward.__self__ is block
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    assert torch.equal(twin(x, t).sample, model(x, t).sample)
    revert(twin)
    assert _is_clean(twin) and not _is_clean(model)
    assert_close(model(x, t).sample, twin(x, t).sample, rtol=RTOL)


# --------------------------------------------------------------------------
# denoising-diffusion-pytorch
# --------------------------------------------------------------------------


def test_ddpm_unet(ddpm):
    _fastdiff_attention_modules()
    model = ddpm.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    report = roundtrip(model, lambda m: m(*_cast(m, x, t)),
                       {DDPMBlock.kind: 22, DDPMAttention.kind: 3, DDPMLinearAttention.kind: 2,
                        DDPMRMSNorm.kind: 29},  # 22 in Blocks, 1 per Attention, 2 per LinearAttention
                       compile_backend="aot_eager")
    assert "mid_attn" in report.patched[DDPMAttention.kind]
    assert "mid_attn.norm" in report.patched[DDPMRMSNorm.kind]
    assert "downs.0.0.block1" in report.patched[DDPMBlock.kind]  # 2.x RMSNorm blocks fused
    assert report.skipped == {}


def test_ddpm_rms_block_calls_the_fused_op_and_falls_back_exactly(ddpm, monkeypatch):
    """A 2.x Block runs one rms_norm_silu call; inputs the op cannot take as the library
    would (broadcast scale-shift, a g of another dtype) run the library's own lines (with
    the block's norm, itself patched, when g has x's dtype)."""
    import fastdiff._optimize as opt

    calls = []
    real = opt.rms_norm_silu
    monkeypatch.setattr(opt, "rms_norm_silu", lambda *a, **k: calls.append(k) or real(*a, **k))
    block = ddpm.Block(4, 6)
    with torch.no_grad():
        block.norm.g.copy_(torch.rand(1, 6, 1, 1) + 0.5)
    twin = copy.deepcopy(block)
    optimize(block)
    x = torch.randn(3, 4, 5, 7)
    scale, shift = torch.randn(3, 6, 1, 1), torch.randn(3, 6, 1, 1)
    assert_close(block(x, (scale, shift)), twin(x, (scale, shift)), rtol=RTOL)
    assert len(calls) == 1 and calls[0]["scale"].shape == (3, 6)
    assert_close(block(x), twin(x), rtol=RTOL)
    assert len(calls) == 2
    broadcast = (torch.randn(1, 6, 1, 1), torch.randn(1, 6, 1, 1))
    assert_close(block(x, broadcast), twin(x, broadcast), rtol=RTOL)  # its patched norm + the lines
    assert len(calls) == 2
    block.norm.g.data = block.norm.g.data.double()
    twin.norm.g.data = twin.norm.g.data.double()
    assert torch.equal(block(x), twin(x))  # promoted to float64 by the library's lines
    assert len(calls) == 2


def test_ddpm_unet_v1_blocks(ddpm):
    _fastdiff_attention_modules()
    _, resnet_block = ddpm.v1_blocks()
    model = ddpm.Unet(8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, resnet_block=resnet_block)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    report = roundtrip(model, lambda m: m(*_cast(m, x, t)),
                       {DDPMBlock.kind: 22, DDPMAttention.kind: 3, DDPMLinearAttention.kind: 2,
                        DDPMRMSNorm.kind: 7},  # the attention blocks' (1.x Blocks use GroupNorm)
                       compile_backend="aot_eager")
    assert "downs.0.0.block1" in report.patched[DDPMBlock.kind]
    assert "downs.0.2.to_out.1" in report.patched[DDPMRMSNorm.kind]
    assert report.skipped == {}


def test_ddpm_rms_norm_calls_the_fused_op_and_falls_back_exactly(ddpm, monkeypatch):
    """A standalone 2.x RMSNorm runs one rms_norm_silu(act=None) call (values and the
    gradients of x and g as the library's lines); a g of another dtype runs the library's
    own lines; an RMSNorm whose scale is not sqrt(C) is skipped with the reason."""
    import fastdiff.nn.attention as fattn

    calls = []
    real = fattn.rms_norm_silu
    monkeypatch.setattr(fattn, "rms_norm_silu", lambda *a, **k: calls.append(k) or real(*a, **k))
    norm = ddpm.RMSNorm(6)
    with torch.no_grad():
        norm.g.copy_(torch.rand(1, 6, 1, 1) + 0.5)
    twin = copy.deepcopy(norm)
    optimize(norm)
    assert norm.fastdiff_report.counts == {DDPMRMSNorm.kind: 1}
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    got, expected = norm(x), twin(x2)
    assert len(calls) == 1 and calls[0]["act"] is None
    assert_close(got, expected, rtol=RTOL)
    grad = torch.randn_like(got)
    got.backward(grad)
    expected.backward(grad)
    assert_close(x.grad, x2.grad, rtol=RTOL, name="dx")
    assert_close(norm.g.grad, twin.g.grad, rtol=RTOL, name="dg")
    with torch.no_grad():
        assert_close(norm(x.double()), twin(x.double()), rtol=RTOL)  # float64 x, float32 g
    assert len(calls) == 1
    revert(norm)
    assert "forward" not in norm.__dict__

    odd = ddpm.RMSNorm(6)
    odd.scale = 1.0
    optimize(odd)
    (path, reason), = odd.fastdiff_report.skipped[DDPMRMSNorm.kind]
    assert "sqrt(C)" in reason and "forward" not in odd.__dict__
