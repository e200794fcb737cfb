"""The ViT encoder of M2D, without timm, keeping timm's state-dict key names.

Tokens are frequency-major: for an LMS ``[B, 1, F, T]`` and patch ``ph x pw`` the patch at
frequency row f and time column t has index ``f * (T // pw) + t``.

Mixed precision: under ``torch.autocast(..., dtype=torch.bfloat16)`` the linear layers and the
patch embedding use cached bfloat16 copies of their float32 weights (`low_precision`), refreshed
once after each optimizer step instead of cast on every call; the numbers are those of autocast's
own casts. Float32 runs do not touch this code.

bfloat16 inference on CPU: `pack_weights` gives the widening linear layers of a bfloat16 model
weights reordered once into oneDNN's blocked layout (what ``torch.compile`` does with frozen
weights), used whenever no gradient is taken; the MLP's first layer then applies GELU inside the
matmul, on the float32 accumulator. Outputs are those of ``F.linear`` (bit for bit with one
thread; with more, oneDNN may split the float32 sums differently); the fused GELU rounds once
instead of twice. In bfloat16 on CPU the patch embedding is one matmul over the flattened patches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    """Dimensions of an M2D encoder: input ``F x T`` frames, patch ``ph x pw``, width and depth."""

    input_size: tuple[int, int] = (80, 608)
    patch_size: tuple[int, int] = (16, 16)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    in_chans: int = 1

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        fp, tp = self.grid_size
        return fp * tp


WIDTHS = {  # model-name width -> (embed_dim, depth, num_heads), as timm's ViT family
    'tiny': (192, 12, 3),
    'small': (384, 12, 6),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
}


def sincos_pos_embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table ``[(1 +) Fp*Tp, dim]`` for a ``Fp x Tp`` grid (row-major)."""
    gh, gw = grid_size
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate([sincos_pos_embed_1d(dim // 2, grid_w), sincos_pos_embed_1d(dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb.astype(np.float32)


def resize_time_positions(pos_embed: torch.Tensor, grid_size: tuple[int, int], time_patches: int) -> torch.Tensor:
    """A position table ``[1, 1 + Fp*Tp, D]`` (cls first) for `time_patches` time columns instead of Tp.

    As the reference's ``get_backbone`` does for ``dur_frames`` (nttcslab/m2d ``m2d/runtime_audio.py``):
    fewer columns keep the first ones; more columns resample the ``Fp x Tp`` grid bicubically to
    ``Fp x time_patches`` (its ``resample_abs_pos_embed``: ``F.interpolate(mode='bicubic')``,
    ``align_corners=False``, no antialiasing; the frequency axis keeps its size, so it is unchanged).
    The cls position is kept as it is.
    """
    fp, tp = grid_size
    if pos_embed.dim() != 3 or pos_embed.shape[:2] != (1, 1 + fp * tp):
        raise ValueError(f'pos_embed {tuple(pos_embed.shape)} is not [1, 1 + {fp}*{tp}, D]')
    if time_patches < 1:
        raise ValueError(f'time_patches must be >= 1, got {time_patches}')
    if time_patches == tp:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:].reshape(1, fp, tp, -1)
    if time_patches < tp:
        grid = grid[:, :, :time_patches]
    else:
        grid = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=(fp, time_patches), mode='bicubic',
                             align_corners=False).permute(0, 2, 3, 1).to(pos_embed.dtype)
    return torch.cat([cls, grid.reshape(1, fp * time_patches, -1)], dim=1)


# ---------------------------------------------------------------------------------------------
# cached low-precision weights under autocast

_SHADOWS = WeakIdKeyDictionary()  # parameter -> (validity key, low-precision copy)
_GENERATION = 0  # bumped after every optimizer step: fused optimizers do not bump tensor versions
_HOOKED = False


def _next_generation(*_) -> None:
    global _GENERATION
    _GENERATION += 1


def clear_low_precision_cache() -> None:
    """Drop every cached copy: frees their memory; needed for correctness only after weights were
    changed through ``.data`` (which hides the change from the version counter)."""
    _next_generation()
    _SHADOWS.clear()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force on `x`'s device, or None when autocast is off there."""
    dev = x.device.type
    if dev in ('cpu', 'cuda') and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class _FromShadow(torch.autograd.Function):
    """Forward: the cached copy; backward: the gradient cast to the parameter's dtype (as autocast's cast)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        ctx.dtype = param.dtype
        return shadow.view_as(shadow)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


def _key(param: torch.Tensor) -> tuple[int, int, int]:
    return _GENERATION, param._version, param.data_ptr()


def _refresh_stale() -> None:
    """Copy every changed parameter into its cached copy: one ``_foreach_copy_`` per device and dtype."""
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for param, (key, shadow) in list(_SHADOWS.items()):
        new_key = _key(param)
        if new_key != key and shadow.shape == param.shape:
            dst, src = groups.setdefault((param.device, param.dtype, shadow.dtype), ([], []))
            dst.append(shadow)
            src.append(param.detach())
            _SHADOWS[param] = (new_key, shadow)
    for dst, src in groups.values():
        torch._foreach_copy_(dst, src)


def low_precision(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`param` rounded to `dtype` (differentiable), from a copy cast once per weight update.

    Copies are refreshed when their parameter changed: an in-place update (its version counter),
    new storage, or any optimizer step (a global post-step hook, since fused optimizers update in
    place without a version bump). All stale copies are refreshed together, in one multi-tensor
    copy, on the first use after an update. The gradient reaches the parameter in its own dtype,
    as through autocast's cast. Under ``torch.compile`` this is a plain cast. The copies live as
    long as their parameters (half the memory of float32 weights); `clear_low_precision_cache`
    frees them.
    """
    global _HOOKED
    if torch.compiler.is_compiling():
        return param.to(dtype)
    if not _HOOKED:
        register_optimizer_step_post_hook(_next_generation)
        _HOOKED = True
    hit = _SHADOWS.get(param)
    stale = hit is not None and hit[0] != _key(param) and hit[1].shape == param.shape
    if stale or hit is None or hit[1].dtype != dtype or hit[1].shape != param.shape:  # a cache hit skips this
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and out of inference mode
            if stale:
                _refresh_stale()
                hit = _SHADOWS[param]
            if hit is None or hit[1].dtype != dtype or hit[1].shape != param.shape:
                hit = (_key(param), param.detach().to(dtype))
                _SHADOWS[param] = hit
    if param.requires_grad and torch.is_grad_enabled():
        return _FromShadow.apply(param, hit[1])
    return hit[1]


def _low_precision_params(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of `layer` as cached low-precision copies when `x` runs under autocast to another
    dtype; None when the layer should run as it is."""
    dtype = autocast_dtype(x)
    if dtype is None or dtype == layer.weight.dtype or not layer.weight.is_floating_point():
        return None
    return low_precision(layer.weight, dtype), None if layer.bias is None else low_precision(layer.bias, dtype)


# ---------------------------------------------------------------------------------------------
# oneDNN-packed bfloat16 weights for CPU inference

_ONEDNN_OK = hasattr(torch.ops.mkldnn, '_linear_pointwise') and torch.backends.mkldnn.is_available()
_PACKED = WeakIdKeyDictionary()  # weight -> ((version, data_ptr), packed weight); outside the module, so
# that deepcopy, pickling and torch.save of a model never meet oneDNN's opaque tensors


def _disable_onednn(e: Exception) -> None:
    global _ONEDNN_OK
    _ONEDNN_OK = False
    log.warning('oneDNN packed linear layers unavailable (%s); using F.linear', e)


class Linear(nn.Linear):
    """`nn.Linear` that runs on cached low-precision weights under autocast (`low_precision`), and
    on oneDNN-packed weights for bfloat16 inference on CPU once `pack_weights` enabled it."""

    pack = False  # set per layer by `pack_weights`

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The oneDNN-packed weight when `x` may use it: packing on, bfloat16 on CPU, no gradient
        taken; repacked after the weight changed."""
        w = self.weight
        usable = (self.pack and _ONEDNN_OK and x.device.type == 'cpu' and x.dtype == w.dtype == torch.bfloat16
                  and not torch.compiler.is_compiling())
        if not usable or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return None
        key = (w._version, w.data_ptr())
        hit = _PACKED.get(w)
        if hit is None or hit[0] != key:
            try:
                hit = _PACKED[w] = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach()))
            except RuntimeError as e:
                _disable_onednn(e)
                return None
        return hit[1]

    def forward(self, x: torch.Tensor, activation: str = 'none') -> torch.Tensor:
        """``F.linear`` of `x`, followed by ``activation`` ('none' or 'gelu')."""
        packed = self.packed_weight(x)
        if packed is not None:
            try:
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, activation, [],
                                                          'none' if activation == 'gelu' else '')
            except RuntimeError as e:  # this layer runs F.linear from now on (which names a bad input)
                log.warning('packed %s failed (%s); using F.linear', self, e)
                self.pack = False
                _PACKED.pop(self.weight, None)
        params = _low_precision_params(self, x)
        y = F.linear(x, self.weight, self.bias) if params is None else F.linear(x, *params)
        return F.gelu(y) if activation == 'gelu' else y


def pack_weights(module: nn.Module, enabled: bool = True) -> int:
    """Let the widening `Linear` layers of `module` (more outputs than inputs: ViT's qkv and MLP fc1)
    run on oneDNN-packed weights for bfloat16 inference on CPU, packed on first use.

    Measured at ViT-Base sizes (500-1500 rows, bf16): 1.1-1.4x the speed of ``F.linear`` with one
    and two threads for the widening layers, while the narrowing ones (768 outputs) ran up to 1.6x
    slower packed with two threads, so they stay on ``F.linear``. Costs a second copy of the packed
    weights, kept outside the module (copies and saves of it are unaffected). Returns the number of
    layers switched.
    """
    layers = [m for m in module.modules() if isinstance(m, Linear) and m.out_features > m.in_features]
    for m in layers:
        m.pack = enabled
        _PACKED.pop(m.weight, None)
    return len(layers)


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch; any input length that is a multiple of the patch."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = _low_precision_params(self.proj, x)
        weight, bias = params if params is not None else (self.proj.weight, self.proj.bias)
        if weight.dtype == torch.bfloat16 and x.device.type == 'cpu':
            return self.matmul_over_patches(x.to(weight.dtype), weight, bias)
        x = self.proj(x) if params is None else F.conv2d(x, *params, self.proj.stride)
        return x.flatten(2).transpose(1, 2)  # [B, D, Fp, Tp] -> [B, Fp*Tp, D]

    def matmul_over_patches(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution as one matmul over the flattened patches, ``[B, Fp*Tp, D]``.

        Used in bfloat16 on CPU, where oneDNN's bf16 convolution took 8-11x as long forward and
        backward (batch of 8 80x608 inputs: 31.6 vs 2.7 ms with one thread, 11.7 vs 1.5 ms with
        two). The same products and float32 sums; only their order differs. Rows and columns past
        the last whole patch are dropped, as the strided convolution drops them.
        """
        ph, pw = self.patch_size
        B, C, H, W = x.shape
        if H % ph or W % pw:
            x = x[..., :H - H % ph, :W - W % pw]
            H, W = H - H % ph, W - W % pw
        patches = x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)  # [B, Fp, Tp, C, ph, pw]
        patches = patches.reshape(B, (H // ph) * (W // pw), C * ph * pw)
        return F.linear(patches, weight.reshape(weight.shape[0], -1), bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if q.requires_grad and q.device.type == 'cpu' and q.dtype == torch.bfloat16:
            x = math_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matmuls.

    Used for bfloat16 training on CPU, where the fused kernel's backward pass is 3-5x slower than
    this for M2D's short sequences (measured: decoder attention fwd+bwd 103 ms vs 32 ms).
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc1.packed_weight(x) is not None:  # GELU inside the packed matmul
            return self.fc2(self.fc1(x, activation='gelu'))
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` key names)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder(nn.Module):
    """Patch embedding, fixed 2-D sin-cos positions, cls token, blocks and final norm."""

    def __init__(self, config: ViTConfig = ViTConfig(), eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        pos = torch.from_numpy(sincos_pos_embed_2d(D, config.grid_size))[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, as in MAE
        self.blocks = nn.ModuleList([Block(D, config.num_heads, config.mlp_ratio, eps) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(D, eps=eps)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_size

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.config.patch_size

    def patch_pos_embed(self, num_time_patches: int) -> torch.Tensor:
        """Position table of the patches ``[1, Fp*Tp', D]`` for an input with Tp' time columns."""
        fp, tp = self.grid_size
        pos = self.pos_embed[:, 1:]
        if num_time_patches == tp:
            return pos
        if num_time_patches > tp:
            raise ValueError(f'input has {num_time_patches} time patches; the model takes at most {tp}')
        return pos.reshape(1, fp, tp, -1)[:, :, :num_time_patches].reshape(1, fp * num_time_patches, -1)

    def embed(self, lms: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions, without cls: ``[B, Fp*Tp', D]``."""
        if lms.dim() != 4 or lms.shape[2] != self.config.input_size[0]:
            raise ValueError(f'expected LMS [B, 1, {self.config.input_size[0]}, T], got {tuple(lms.shape)}')
        x = self.patch_embed(lms)
        return x + self.patch_pos_embed(x.shape[1] // self.grid_size[0])

    def cls_with_pos(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def run_blocks(self, x: torch.Tensor, return_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Blocks then final norm; with `return_layers`, every block output (the last normalized)."""
        layers = []
        for blk in self.blocks:
            x = blk(x)
            if return_layers:
                layers.append(x)
        x = self.norm(x)
        if return_layers:
            layers[-1] = x
            return layers
        return x

    def forward(self, lms: torch.Tensor, return_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Encode an unmasked LMS chunk: ``[B, 1 + Fp*Tp', D]`` (cls first), or a list per layer."""
        x = self.embed(lms)
        x = torch.cat([self.cls_with_pos(x.shape[0]), x], dim=1)
        return self.run_blocks(x, return_layers)
