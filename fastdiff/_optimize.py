"""``fastdiff.optimize(model)`` and ``fastdiff.revert(model)``: in-place drop-in patching.

    model = fastdiff.optimize(model, verbose=True)   # same outputs, fused kernels
    print(model.fastdiff_report)                     # what changed, what was skipped and why
    fastdiff.revert(model)                           # the original modules and forwards again

How it works
------------
One registry (:data:`PATCHERS`) maps module classes to :class:`Patcher` objects.
:func:`optimize` walks the module tree once; for each module whose class a
patcher claims, the patcher first says whether it can take this instance
(:meth:`Patcher.why_not`: the structure it relies on is there, the activation is
SiLU, no hooks sit on a submodule the fused path would bypass, ...) and then
applies one of three mechanisms, whichever keeps the module's parameters and
state_dict keys untouched:

* **rebind** -- where the fusable pieces (time-embedding add, scale-shift) live
  in the block's own ``forward`` (diffusers ``ResnetBlock2D``,
  denoising-diffusion-pytorch ``Block``), the instance gets a ``forward`` of its
  own (Liger's instance-level patching): a line-for-line copy of the library's
  forward in which only ``norm -> [+ emb | * (1 + scale) + shift] -> SiLU`` is one
  :func:`fastdiff.ops.group_norm_silu` call reading the block's own ``norm``
  parameters.  Nothing is added to or removed from the module tree.  Inputs the
  fused op cannot take exactly as the library would (a broadcast batch, a dtype
  that the library would promote) run the library's unfused lines instead.
* **swap** -- where a whole module has a fastdiff equivalent
  (denoising-diffusion-pytorch ``Attention`` / ``LinearAttention`` ->
  :class:`fastdiff.nn.Attention` / :class:`fastdiff.nn.LinearAttention`, a
  ``GroupNorm`` followed by ``SiLU`` in a ``Sequential`` or in a diffusers U-Net's
  output head -> ``fastdiff.nn.GroupNorm(act="silu")`` and an ``nn.Identity`` in
  the SiLU's slot), the replacement adopts the original's Parameter objects and
  submodules (never copies), under the same names and in the same order, so
  ``state_dict()`` is identical key by key and tensor by tensor and an optimizer
  built before ``optimize`` still steps the live parameters.
* **processor** -- diffusers ``Attention`` gets :class:`FastdiffAttnProcessor`
  (only where it runs diffusers' default ``AttnProcessor2_0`` / ``AttnProcessor``,
  whose semantics that processor reproduces; custom, IP-adapter, added-KV, ...
  processors are left alone).

Every patched module carries its patch kind and what revert needs (the original
modules, the previous processor) in its ``__dict__``, not in a side table, so
:func:`revert` works on any model object, deep copies (EMA) included, and
``optimize`` twice is a no-op the second time.  These attributes are neither
parameters nor buffers: checkpoints are unaffected.  Supporting another model
is one more :class:`Patcher` in :data:`PATCHERS`.

Classes are matched by module path and class name (exact class, not
subclasses, which may override ``forward``), so neither diffusers nor
denoising-diffusion-pytorch is imported here; denoising-diffusion-pytorch's
U-Net lives in ``denoising_diffusion_pytorch.denoising_diffusion_pytorch`` (its
1-D, guided and classifier-free-guidance variants define same-named but
different classes and are deliberately not matched).

denoising-diffusion-pytorch's ``Block`` is fused in both generations: 1.x
normalises with ``GroupNorm`` (-> :func:`fastdiff.ops.group_norm_silu`), 2.x with
an RMSNorm over channels (``F.normalize(x, dim=1) * g * sqrt(C)`` ->
:func:`fastdiff.ops.rms_norm_silu`); the standalone RMSNorms around its attention blocks
become ``rms_norm_silu(act=None)`` calls (2.x's, and 1.x's, which takes sqrt(C) from x
in its forward instead of a ``scale`` attribute).  Both generations are tested against
the released packages (2.3.4 and 1.11.1: tests/test_ddpm_package.py).

Limitations: a rebound ``forward`` is a bound
method in the instance's ``__dict__``: ``copy.deepcopy`` handles it, pickling
the whole module object (``torch.save(model)``) does not -- save the
``state_dict`` or ``revert`` first.  Hooks registered on a bypassed submodule
(e.g. ``norm1``) after ``optimize`` do not run.  Call ``optimize`` before
``torch.compile``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn.group_norm import GroupNorm as _FastGroupNorm
from .ops.group_norm import group_norm_silu
from .ops.rms_norm import rms_norm_silu

__all__ = ["OptimizeReport", "PATCHERS", "Patcher", "optimize", "register", "revert"]

logger = logging.getLogger("fastdiff.optimize")

_KIND = "_fastdiff_patch"  # on a patched module: the kind of its patch
_STATE = "_fastdiff_state"  # on a patched module: what revert needs
REPORT_ATTR = "fastdiff_report"  # on the root passed to optimize: its OptimizeReport

_DDPM_UNET = r"denoising_diffusion_pytorch\.denoising_diffusion_pytorch"


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


@dataclass
class OptimizeReport:
    """What :func:`optimize` did: module paths per patch kind, and what it skipped, with why."""

    patched: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Number of modules patched per kind."""
        return {kind: len(paths) for kind, paths in self.patched.items()}

    def __str__(self) -> str:
        total = sum(self.counts.values())
        lines = [f"fastdiff.optimize: {total} module(s) patched"]
        for kind, paths in self.patched.items():
            lines.append(f"  {kind}: {len(paths)} ({_preview(paths)})")
        for kind, items in self.skipped.items():
            by_reason: dict[str, list[str]] = {}
            for path, reason in items:
                by_reason.setdefault(reason, []).append(path)
            for reason, paths in by_reason.items():
                lines.append(f"  skipped {kind}: {len(paths)} ({_preview(paths)}): {reason}")
        return "\n".join(lines)


def _preview(paths: list[str], n: int = 3) -> str:
    shown = ", ".join(p or "<root>" for p in paths[:n])
    return shown + (", ..." if len(paths) > n else "")


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


class Patcher:
    """How to fuse one kind of module, and how to undo it.

    ``classes`` lists what it claims: a class (exact type) or a
    ``"module.regex:ClassName"`` string matched against ``type(m).__module__``
    and ``type(m).__name__``.  ``swaps`` says :meth:`apply` returns a new module
    to put in the original's place (which needs a parent); otherwise it patches
    in place and returns the module itself.
    """

    kind: str = ""
    classes: tuple = ()
    swaps: bool = False

    def matches(self, cls: type) -> bool:
        for spec in self.classes:
            if isinstance(spec, type):
                if cls is spec:
                    return True
            else:
                mod, _, name = spec.partition(":")
                if cls.__name__ == name and re.fullmatch(mod, cls.__module__ or ""):
                    return True
        return False

    def relevant(self, module: nn.Module) -> bool:
        """False: nothing here for this patcher, not even worth reporting as skipped."""
        return True

    def why_not(self, module: nn.Module) -> Optional[str]:
        """Why this instance cannot be patched, or None."""
        return None

    def apply(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError

    def revert(self, module: nn.Module) -> nn.Module:
        raise NotImplementedError


PATCHERS: list[Patcher] = []
_BY_KIND: dict[str, Patcher] = {}
_FOR_CLASS: dict[type, Optional[Patcher]] = {}


def register(patcher: Patcher) -> Patcher:
    """Add a patcher to the registry (first match wins, in registration order)."""
    if patcher.kind in _BY_KIND:
        raise ValueError(f"a patcher of kind {patcher.kind!r} is already registered")
    PATCHERS.append(patcher)
    _BY_KIND[patcher.kind] = patcher
    _FOR_CLASS.clear()
    return patcher


def _patcher_for(cls: type) -> Optional[Patcher]:
    if cls not in _FOR_CLASS:
        _FOR_CLASS[cls] = next((p for p in PATCHERS if p.matches(cls)), None)
    return _FOR_CLASS[cls]


# --------------------------------------------------------------------------
# Helpers shared by the patchers
# --------------------------------------------------------------------------


def _plain_group_norm(m) -> bool:
    """A GroupNorm whose forward is exactly F.group_norm with its own parameters."""
    return type(m) is nn.GroupNorm or (type(m) is _FastGroupNorm and m.act is None)


def _hooked(*modules) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
        for m in modules if isinstance(m, nn.Module)
    )


def _per_sample_channel(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """t of shape (N, C, 1, ...) matching x (N, C, *spatial) -> an (N, C) view; None where the
    fused op would not compute exactly what broadcasting ``x + t`` computes (other shapes, a
    broadcast batch, another dtype or device)."""
    if (t is None or t.dim() != x.dim() or t.shape[:2] != x.shape[:2]
            or any(s != 1 for s in t.shape[2:]) or t.dtype != x.dtype or t.device != x.device):
        return None
    return t.flatten(1)


def _gn_silu(norm: nn.GroupNorm, x: torch.Tensor, **cond) -> torch.Tensor:
    """silu(norm(x + emb) * (1 + scale) + shift) with ``norm``'s own parameters."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, act="silu", **cond)


def _bind_forward(module: nn.Module, fn: Callable) -> nn.Module:
    module.__dict__["forward"] = types.MethodType(fn, module)
    return module


def _unbind_forward(module: nn.Module) -> nn.Module:
    module.__dict__.pop("forward", None)
    return module


def _fused_group_norm(gn: nn.GroupNorm) -> nn.Module:
    """fastdiff.nn.GroupNorm(act="silu") holding gn's Parameter objects."""
    fused = _FastGroupNorm(gn.num_groups, gn.num_channels, gn.eps, gn.affine, act="silu",
                           device="meta")
    fused.weight, fused.bias = gn.weight, gn.bias  # the same Parameter objects (or None)
    fused.training = gn.training
    return fused


# --------------------------------------------------------------------------
# GroupNorm + SiLU pairs: nn.Sequential, diffusers U-Net output heads
# --------------------------------------------------------------------------


class _PairPatcher(Patcher):
    """Replaces GroupNorm -> SiLU pairs of child slots by a fused GroupNorm and an Identity.

    The container itself stays; its state records (gn slot, act slot, originals)."""

    def pairs(self, module: nn.Module) -> list[tuple[str, str]]:
        raise NotImplementedError

    def relevant(self, module):
        return bool(self.pairs(module))

    def why_not(self, module):
        for gn_name, act_name in self.pairs(module):
            if _hooked(module._modules[gn_name], module._modules[act_name]):
                return f"hooks on {gn_name!r} or {act_name!r}"
        return None

    def apply(self, module):
        saved = []
        for gn_name, act_name in self.pairs(module):
            gn, act = module._modules[gn_name], module._modules[act_name]
            module._modules[gn_name] = _fused_group_norm(gn)
            module._modules[act_name] = nn.Identity()
            saved.append((gn_name, gn, act_name, act))
        module.__dict__[_STATE] = saved
        return module

    def revert(self, module):
        for gn_name, gn, act_name, act in module.__dict__.pop(_STATE):
            module._modules[gn_name] = gn
            module._modules[act_name] = act
        return module


class SequentialGroupNormSiLU(_PairPatcher):
    """``nn.Sequential(..., GroupNorm, SiLU, ...)`` (torch's or fastdiff's GroupNorm with act=None)."""

    kind = "GroupNorm+SiLU in Sequential"
    classes = (nn.Sequential,)

    def matches(self, cls):
        return issubclass(cls, nn.Sequential) and cls.forward is nn.Sequential.forward

    def pairs(self, module):
        names = list(module._modules)
        out, i = [], 0
        while i + 1 < len(names):
            a, b = module._modules[names[i]], module._modules[names[i + 1]]
            if _plain_group_norm(a) and type(b) is nn.SiLU:
                out.append((names[i], names[i + 1]))
                i += 2
            else:
                i += 1
        return out


_HEAD_SOURCE = re.compile(
    r"(\w+) = self\.conv_norm_out\(\1\)\s*\n\s*\1 = self\.conv_act\(\1\)")


class DiffusersUNetOutputHead(_PairPatcher):
    """diffusers ``UNet2DModel`` / ``UNet2DConditionModel``: ``conv_norm_out`` -> ``conv_act``.

    Fused only when the class's forward applies ``conv_act`` exactly once, right after
    ``conv_norm_out`` (checked on its source, once per class)."""

    kind = "diffusers UNet output GroupNorm+SiLU"
    classes = (r"diffusers\.models(\.unets)?\.unet_2d:UNet2DModel",
               r"diffusers\.models(\.unets)?\.unet_2d_condition:UNet2DConditionModel")
    _source_ok: dict[type, bool] = {}

    def _forward_is_known(self, cls) -> bool:
        if cls not in self._source_ok:
            try:
                src = inspect.getsource(cls.forward)
            except (OSError, TypeError):
                src = ""
            self._source_ok[cls] = src.count("self.conv_act(") == 1 and bool(_HEAD_SOURCE.search(src))
        return self._source_ok[cls]

    def pairs(self, module):
        gn, act = module._modules.get("conv_norm_out"), module._modules.get("conv_act")
        if _plain_group_norm(gn) and type(act) is nn.SiLU:
            return [("conv_norm_out", "conv_act")]
        return []

    def why_not(self, module):
        if not self._forward_is_known(type(module)):
            return "its forward does not apply conv_act right after conv_norm_out only"
        return super().why_not(module)


# --------------------------------------------------------------------------
# diffusers ResnetBlock2D: rebound forward
# --------------------------------------------------------------------------


def _resnet_block_2d_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor,
                             *args, **kwargs) -> torch.Tensor:
    """diffusers 0.42 ``ResnetBlock2D.forward`` with norm1->SiLU and (h + temb)->norm2->SiLU
    (or norm2 -> scale-shift -> SiLU) as single ``group_norm_silu`` calls."""
    if len(args) > 0 or kwargs.get("scale", None) is not None:
        from diffusers.utils import deprecate

        deprecate("scale", "1.0.0", (
            "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it "
            "will raise an error in the future. `scale` should directly be passed while calling the "
            "underlying pipeline component i.e., via `cross_attention_kwargs`."))

    hidden_states = input_tensor

    hidden_states = _gn_silu(self.norm1, hidden_states)  # norm1 -> nonlinearity

    if self.upsample is not None:
        # upsample_nearest_nhwc fails with large batch sizes (diffusers issue 984)
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]

    if self.time_embedding_norm == "default":
        emb = _per_sample_channel(temb, hidden_states)
        if temb is not None and emb is None:  # not an (N, C) add: the library's lines
            hidden_states = hidden_states + temb
        hidden_states = _gn_silu(self.norm2, hidden_states, emb=emb)  # (+ temb) -> norm2 -> nonlinearity
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(
                f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}"
            )
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        scale = _per_sample_channel(time_scale, hidden_states)
        shift = _per_sample_channel(time_shift, hidden_states)
        if scale is None or shift is None:
            hidden_states = self.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
            hidden_states = self.nonlinearity(hidden_states)
        else:  # norm2 -> * (1 + scale) + shift -> nonlinearity
            hidden_states = _gn_silu(self.norm2, hidden_states, scale=scale, shift=shift)
    else:
        hidden_states = _gn_silu(self.norm2, hidden_states)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)

    if self.conv_shortcut is not None:
        # contiguous() only in training (DDP gradient strides), as diffusers does
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)

    output_tensor = input_tensor + hidden_states
    if self.output_scale_factor != 1.0:  # x / 1.0 is x exactly: one pass over h saved
        output_tensor = output_tensor / self.output_scale_factor

    return output_tensor


class DiffusersResnetBlock2D(Patcher):
    kind = "diffusers ResnetBlock2D"
    classes = (r"diffusers\.models\.resnet:ResnetBlock2D",)

    def why_not(self, module):
        if "forward" in module.__dict__:
            return "its forward is already replaced on the instance (e.g. by accelerate hooks)"
        if not (_plain_group_norm(module.norm1) and _plain_group_norm(module.norm2)):
            return "norm1/norm2 are not plain GroupNorms"
        if type(module.nonlinearity) is not nn.SiLU:
            return f"nonlinearity is {type(module.nonlinearity).__name__}, not SiLU"
        if "LoRACompatibleConv" in (type(module.conv1).__name__, type(module.conv2).__name__):
            return "conv1/conv2 take a LoRA scale (a diffusers release before 0.26)"
        if module.time_embedding_norm not in ("default", "scale_shift"):
            return f"time_embedding_norm={module.time_embedding_norm!r}"
        if _hooked(module.norm1, module.norm2, module.nonlinearity):
            return "hooks on norm1, norm2 or nonlinearity"
        return None

    def apply(self, module):
        return _bind_forward(module, _resnet_block_2d_forward)

    def revert(self, module):
        return _unbind_forward(module)


# --------------------------------------------------------------------------
# diffusers Attention: FastdiffAttnProcessor
# --------------------------------------------------------------------------


class DiffusersAttention(Patcher):
    kind = "diffusers Attention processor"
    classes = (r"diffusers\.models\.attention_processor:Attention",)
    _DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")

    def why_not(self, module):
        try:
            importlib.import_module(".nn.diffusers_processor", __package__)
        except ImportError as e:
            return f"fastdiff.nn.diffusers_processor is not available ({e})"
        proc = getattr(module, "processor", None)
        cls = type(proc)
        if not (cls.__name__ in self._DEFAULT_PROCESSORS
                and cls.__module__.startswith("diffusers.")):
            return f"runs processor {cls.__name__}, not diffusers' default"
        return None

    def apply(self, module):
        from .nn.diffusers_processor import FastdiffAttnProcessor

        module.__dict__[_STATE] = module.processor
        module.set_processor(FastdiffAttnProcessor())
        return module

    def revert(self, module):
        module.set_processor(module.__dict__.pop(_STATE))
        return module


# --------------------------------------------------------------------------
# denoising-diffusion-pytorch's U-Net
# --------------------------------------------------------------------------


# 1.x's RMSNorm.forward: the same function, with sqrt(C) taken from x in the forward
_RMS_V1_SOURCE = re.compile(
    r"return\s+F\.normalize\(\s*x\s*,\s*dim\s*=\s*1\s*\)\s*\*\s*self\.g\s*\*\s*"
    r"\(\s*x\.shape\[1\]\s*\*\*\s*0\.5\s*\)\s*$")
_RMS_V1_FORWARDS: dict[type, bool] = {}


def _ddpm_rms_norm_release(m) -> Optional[int]:
    """2 for denoising-diffusion-pytorch 2.x's ``RMSNorm`` (``F.normalize(x, dim=1) * g *
    scale`` with ``scale = C ** 0.5`` set in ``__init__``), 1 for 1.x's (``F.normalize(x,
    dim=1) * g * (x.shape[1] ** 0.5)``, no ``scale``), None otherwise; ``g`` of shape
    (1, C, 1, 1) in both (what rms_norm_silu computes)."""
    cls = type(m)
    if not (cls.__name__ == "RMSNorm" and re.fullmatch(_DDPM_UNET, cls.__module__ or "")):
        return None
    g = m._parameters.get("g")
    if g is None or g.dim() != 4 or g.shape[0] != 1 or tuple(g.shape[2:]) != (1, 1):
        return None
    if "scale" in m.__dict__:
        return 2 if m.scale == g.shape[1] ** 0.5 else None
    if cls not in _RMS_V1_FORWARDS:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _RMS_V1_FORWARDS[cls] = bool(_RMS_V1_SOURCE.search(src.strip()))
    return 1 if _RMS_V1_FORWARDS[cls] else None


def _ddpm_rms_norm(m) -> bool:
    return _ddpm_rms_norm_release(m) is not None


def _ddpm_rms_norm_v1_forward(self, x: torch.Tensor) -> torch.Tensor:
    """1.x ``RMSNorm.forward`` as one ``rms_norm_silu(act=None)`` call where x has g's
    channels and dtype (else the library's line: it broadcasts or promotes)."""
    if x.dim() < 2 or x.shape[1] != self.g.shape[1] or self.g.dtype != x.dtype:
        return F.normalize(x, dim=1) * self.g * (x.shape[1] ** 0.5)
    return rms_norm_silu(x, self.g.reshape(-1), act=None)


def _ddpm_block_forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
    """denoising-diffusion-pytorch ``Block.forward`` with norm -> scale-shift -> act as one
    ``group_norm_silu`` (1.x GroupNorm) or ``rms_norm_silu`` (2.x RMSNorm) call; dropout
    where the block has one."""
    x = self.proj(x)
    rms = type(self.norm) is not nn.GroupNorm and type(self.norm) is not _FastGroupNorm

    scale = shift = None
    fusable = not rms or self.norm.g.dtype == x.dtype  # else the library promotes x * g
    if scale_shift is not None:
        time_scale, time_shift = scale_shift
        scale = _per_sample_channel(time_scale, x)
        shift = _per_sample_channel(time_shift, x)
        fusable = fusable and scale is not None and shift is not None  # (N, C, 1, 1) only
    if not fusable:  # the library's lines
        x = self.norm(x)
        if scale_shift is not None:
            x = x * (time_scale + 1) + time_shift
        x = self.act(x)
        return self.dropout(x) if "dropout" in self._modules else x

    if rms:
        x = rms_norm_silu(x, self.norm.g.reshape(-1), act="silu", scale=scale, shift=shift)
    else:
        x = _gn_silu(self.norm, x, scale=scale, shift=shift)
    return self.dropout(x) if "dropout" in self._modules else x


class DDPMBlock(Patcher):
    kind = "denoising-diffusion-pytorch Block"
    classes = (_DDPM_UNET + ":Block",)

    def why_not(self, module):
        if "forward" in module.__dict__:
            return "its forward is already replaced on the instance"
        norm = module._modules.get("norm")
        if not (_plain_group_norm(norm) or _ddpm_rms_norm(norm)):
            return (f"norm is {type(norm).__name__}, neither a GroupNorm (1.x) nor the 2.x "
                    "RMSNorm (F.normalize(x, dim=1) * g * sqrt(C))")
        if type(module._modules.get("act")) is not nn.SiLU:
            return "act is not SiLU"
        if _hooked(norm, module.act):
            return "hooks on norm or act"
        return None

    def apply(self, module):
        return _bind_forward(module, _ddpm_block_forward)

    def revert(self, module):
        return _unbind_forward(module)


class DDPMRMSNorm(Patcher):
    """A standalone 2.x ``RMSNorm`` (the norms before and after ``Attention`` /
    ``LinearAttention``; a ``Block``'s own norm is also covered, for the fallback lines
    of its patched forward): ``F.normalize`` + two broadcast multiplies become one
    ``rms_norm_silu(act=None)`` call (fastdiff.nn.RMSNorm's forward, which keeps the
    library's lines when ``g`` has another dtype than x)."""

    kind = "denoising-diffusion-pytorch RMSNorm"
    classes = (_DDPM_UNET + ":RMSNorm",)

    def why_not(self, module):
        if "forward" in module.__dict__:
            return "its forward is already replaced on the instance"
        if not _ddpm_rms_norm(module):
            return ("not F.normalize(x, dim=1) * g * sqrt(C) (2.x: C from scale; 1.x: from x) "
                    "with g of shape (1, C, 1, 1)")
        if _hooked(module):
            return "hooks on the module"
        return None

    def apply(self, module):
        from .nn.attention import RMSNorm

        v1 = _ddpm_rms_norm_release(module) == 1
        return _bind_forward(module, _ddpm_rms_norm_v1_forward if v1 else RMSNorm.forward)

    def revert(self, module):
        return _unbind_forward(module)


class _DDPMAttentionSwap(Patcher):
    """Swaps in a fastdiff module constructed on the meta device, then given the original's
    Parameter objects and submodules under the same names; the original is kept for revert."""

    swaps = True
    fastdiff_name = ""
    mem_kv_slots_dim = -1  # the num_mem_kv axis of mem_kv

    def _fastdiff_cls(self):
        from .nn import attention

        return getattr(attention, self.fastdiff_name)

    def _extra_check(self, module) -> Optional[str]:
        return None

    def why_not(self, module):
        try:
            self._fastdiff_cls()
        except (ImportError, AttributeError) as e:
            return f"fastdiff.nn.{self.fastdiff_name} is not available ({e})"
        for name in ("norm", "to_qkv", "to_out"):
            if name not in module._modules:
                return f"no {name!r} submodule (an unsupported release)"
        if type(module.to_qkv) is not nn.Conv2d or not isinstance(getattr(module, "heads", None), int):
            return "to_qkv is not a Conv2d or heads is not an int (an unsupported release)"
        if not isinstance(module._parameters.get("mem_kv"), nn.Parameter):
            return "no mem_kv memory key/values (an unsupported release)"
        if _hooked(module):
            return "hooks on the module"
        return self._extra_check(module)

    def _build(self, module):
        heads = module.heads
        mem_kv = module.mem_kv
        dim = module.to_qkv.in_channels
        dim_head = module.to_qkv.out_channels // (3 * heads)
        with torch.device("meta"):
            new = self._fastdiff_cls()(dim, heads=heads, dim_head=dim_head,
                                       num_mem_kv=mem_kv.shape[self.mem_kv_slots_dim],
                                       **self._extra_kwargs(module))
        return new

    def _extra_kwargs(self, module) -> dict:
        return {}

    def apply(self, module):
        try:
            new = self._build(module)
        except (TypeError, ValueError) as e:  # a constructor that no longer fits
            raise RuntimeError(f"fastdiff.nn.{self.fastdiff_name} could not be built ({e})") from e
        if not (set(new._parameters) <= set(module._parameters)
                and set(new._modules) <= set(module._modules)):
            raise RuntimeError(f"fastdiff.nn.{self.fastdiff_name} has other parameters or submodules")
        for name in new._parameters:
            setattr(new, name, module._parameters[name])  # the same Parameter objects
        for name in new._modules:
            new._modules[name] = module._modules[name]
        new.training = module.training
        new_sd, old_sd = new.state_dict(keep_vars=True), module.state_dict(keep_vars=True)
        if list(new_sd) != list(old_sd) or any(a is not b for a, b in zip(new_sd.values(), old_sd.values())):
            raise RuntimeError(f"fastdiff.nn.{self.fastdiff_name} has another state_dict layout")
        new.__dict__[_STATE] = module
        return new

    def revert(self, module):
        return module.__dict__.pop(_STATE)


class DDPMAttention(_DDPMAttentionSwap):
    kind = "denoising-diffusion-pytorch Attention"
    classes = (_DDPM_UNET + ":Attention",)
    fastdiff_name = "Attention"
    mem_kv_slots_dim = 2  # (2, heads, num_mem_kv, dim_head)

    def _extra_check(self, module):
        attend = module._modules.get("attend")
        if attend is None:
            return "no 'attend' submodule (an unsupported release)"
        if getattr(attend, "dropout", 0.0) or getattr(attend, "scale", None) is not None:
            return "attention dropout or a custom scale"
        return None

    def _extra_kwargs(self, module):
        return {"flash": bool(getattr(module.attend, "flash", False))}


class DDPMLinearAttention(_DDPMAttentionSwap):
    kind = "denoising-diffusion-pytorch LinearAttention"
    classes = (_DDPM_UNET + ":LinearAttention",)
    fastdiff_name = "LinearAttention"
    mem_kv_slots_dim = 3  # (2, heads, dim_head, num_mem_kv)

    def _extra_check(self, module):
        if getattr(module, "scale", None) != (module.to_qkv.out_channels // (3 * module.heads)) ** -0.5:
            return "a custom scale"
        return None


for _patcher in (DiffusersResnetBlock2D(), DiffusersAttention(), DiffusersUNetOutputHead(),
                 DDPMBlock(), DDPMAttention(), DDPMLinearAttention(), DDPMRMSNorm(),
                 SequentialGroupNormSiLU()):
    register(_patcher)
del _patcher


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def _patch(module: nn.Module, path: str, parent: Optional[nn.Module], name: Optional[str],
           report: OptimizeReport) -> nn.Module:
    patcher = _patcher_for(type(module))
    if patcher is None or _KIND in module.__dict__ or not patcher.relevant(module):
        return module
    reason = patcher.why_not(module)
    if reason is None and patcher.swaps and parent is None:
        reason = "the root module cannot be replaced in place (optimize its parent)"
    if reason is None:
        try:
            new = patcher.apply(module)
        except RuntimeError as e:  # a layout check that failed: nothing was changed
            reason = str(e)
    if reason is not None:
        report.skipped.setdefault(patcher.kind, []).append((path, reason))
        return module
    new.__dict__[_KIND] = patcher.kind
    if new is not module:
        parent._modules[name] = new
    report.patched.setdefault(patcher.kind, []).append(path)
    return new


def _walk(module: nn.Module, prefix: str, visit) -> None:
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        child = visit(child, path, module, name)
        _walk(child, path, visit)


def optimize(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Swap supported parts of ``model`` for fused fastdiff ones, in place; returns ``model``.

    Parameters, buffers and state_dict keys are kept (the very same Parameter
    objects), so checkpoints load and optimizers keep stepping them.  What
    changed and what was skipped (with the reason) in this call is in
    ``model.fastdiff_report`` (an :class:`OptimizeReport`); ``verbose=True``
    logs one line per kind at INFO on the ``fastdiff.optimize`` logger
    (DEBUG otherwise).  Unsupported modules are left as they are; calling it
    again patches only what is new.  Undo with :func:`revert`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdiff.optimize: expected an nn.Module, got {type(model).__name__}")
    report = OptimizeReport()

    def visit(module, path, parent, name):
        return _patch(module, path, parent, name, report)

    visit(model, "", None, None)
    _walk(model, "", visit)
    model.__dict__[REPORT_ATTR] = report
    level = logging.INFO if verbose else logging.DEBUG
    for kind, paths in report.patched.items():
        logger.log(level, "fastdiff.optimize: %s: %d patched", kind, len(paths))
    for kind, items in report.skipped.items():
        reasons = sorted({r for _, r in items})
        logger.log(level, "fastdiff.optimize: %s: %d skipped (%s)", kind, len(items), "; ".join(reasons))
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize` in place: original forwards, processors and modules; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastdiff.revert: expected an nn.Module, got {type(model).__name__}")

    def visit(module, path, parent, name):
        kind = module.__dict__.pop(_KIND, None)
        if kind is None:
            return module
        original = _BY_KIND[kind].revert(module)
        if original is not module:
            parent._modules[name] = original
        return original

    visit(model, "", None, None)
    _walk(model, "", visit)
    model.__dict__.pop(REPORT_ATTR, None)
    return model
