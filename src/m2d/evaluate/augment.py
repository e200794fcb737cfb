"""Fine-tuning augmentations, as EVAR's ``finetune.py`` applies them (METHOD.md, "Downstream protocol").

- `mixup`: on the waveforms and one-hot targets of a batch, one ``λ ~ Beta(α, α)`` per sample, the
  partner of each sample drawn by a random permutation of the batch (``np.random.permutation``
  in EVAR).
- `spec_mask`: SpecAugment on the normalized LMS: per sample, one frequency band of width
  ``⌊U·freq_mask⌋`` bins and one time band of width ``⌊U·time_mask⌋`` frames set to 0
  (torchaudio's ``FrequencyMasking``/``TimeMasking`` arithmetic; EVAR draws one band for the whole
  batch, here each sample gets its own).
- `random_resize_crop`: BYOL-A's random resize crop of the normalized LMS: the LMS is placed in the
  middle of a zero canvas 1.0x its height and 1.5x its width, a box of ``U(0.6, 1.5)`` times the
  input height and width (clipped to the canvas) is cut at a random place and resized back
  (bicubic, align_corners) to the input size. Vectorized with ``grid_sample`` (one call per batch).

`spec_mask` and `random_resize_crop` take an optional ``torch.Generator`` and `mixup` a numpy\n``Generator``, so a run is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RRC_CANVAS = (1.0, 1.5)      # virtual crop canvas, (F ratio, T ratio) of the input
RRC_SCALE = (0.6, 1.5)       # crop size range, ratio of the input size (both axes)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else 'cpu'
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float,
          rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each sample with a partner drawn by a random permutation of the batch (EVAR's ``Mixup``).

    Args:
        x: inputs ``[B, ...]`` (waveforms ``[B, samples]``).
        y: float targets ``[B, C]`` (one-hot or multi-hot).
        alpha: Beta parameter; 0 returns the inputs unchanged (λ = 1).
        rng: numpy generator for ``λ ~ Beta(α, α)`` (EVAR draws with numpy too).
    Returns:
        ``(λ x + (1-λ) x[p], λ y + (1-λ) y[p], λ)`` with ``λ`` ``[B]`` and ``p`` the permutation
        (drawn after ``λ``, as EVAR draws them; a sample may be its own partner, as there).
    """
    if alpha < 0:
        raise ValueError(f'mixup alpha must be >= 0, got {alpha}')
    B = x.shape[0]
    if alpha == 0 or B < 2:
        return x, y, torch.ones(B, device=x.device)
    rng = rng if rng is not None else np.random.default_rng()
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=B)).to(x.device, torch.float32)
    p = torch.from_numpy(rng.permutation(B)).to(x.device)
    lx = lam.view((B,) + (1,) * (x.dim() - 1)).to(x.dtype)
    ly = lam.view((B,) + (1,) * (y.dim() - 1)).to(y.dtype)
    return x * lx + x[p] * (1 - lx), y * ly + y[p] * (1 - ly), lam


def spec_mask(lms: torch.Tensor, freq_mask: int, time_mask: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one random frequency band and one random time band per sample of ``[B, 1, F, T]``.

    Widths are ``⌊u·freq_mask⌋`` and ``⌊u·time_mask⌋`` with ``u ~ U(0,1)``, capped at F and T;
    starts are ``⌊u·(size - width)⌋``. 0 disables an axis. Returns a new tensor.
    """
    if freq_mask < 0 or time_mask < 0:
        raise ValueError(f'freq_mask and time_mask must be >= 0, got {freq_mask} and {time_mask}')
    B, _, Fb, T = lms.shape
    keep = torch.ones(B, 1, Fb, T, dtype=lms.dtype, device=lms.device)
    for axis, param, size in ((2, freq_mask, Fb), (3, time_mask, T)):
        if param <= 0:
            continue
        u = _uniform((2, B), generator, lms.device)
        width = (u[0] * min(param, size)).floor()
        start = (u[1] * (size - width)).floor()
        pos = torch.arange(size, device=lms.device)[None]
        band = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # [B, size]
        band = band[:, None, :, None] if axis == 2 else band[:, None, None, :]
        keep = keep.masked_fill(band, 0)
    return lms * keep


def random_resize_crop(lms: torch.Tensor, generator: torch.Generator | None = None,
                       canvas: tuple[float, float] = RRC_CANVAS,
                       scale: tuple[float, float] = RRC_SCALE) -> torch.Tensor:
    """BYOL-A/EVAR random resize crop of each sample of ``[B, 1, F, T]`` (same shape out).

    Crop height ``h = clip(⌊U(scale)·F⌋, 1, canvas_h)``, width likewise with T; top-left corner
    uniform over the canvas positions where the box fits; bicubic resize with align_corners.
    """
    B, C, Fb, T = lms.shape
    ch, cw = int(Fb * canvas[0]), int(T * canvas[1])
    oy, ox = (ch - Fb) // 2, (cw - T) // 2          # the input's place on the canvas
    u = _uniform((4, B), generator, 'cpu').double()
    h = (u[0] * (scale[1] - scale[0]) + scale[0]).mul(Fb).floor().clamp(1, ch)
    w = (u[1] * (scale[1] - scale[0]) + scale[0]).mul(T).floor().clamp(1, cw)
    i = (u[2] * (ch - h + 1)).floor().clamp(max=ch - h)   # randint(0, ch - h)
    j = (u[3] * (cw - w + 1)).floor().clamp(max=cw - w)
    # Output pixel (y, x) reads canvas (i + y (h-1)/(F-1), j + x (w-1)/(T-1)), i.e. input (.. - oy, .. - ox).
    ys = torch.arange(Fb, dtype=torch.float64) / max(Fb - 1, 1)
    xs = torch.arange(T, dtype=torch.float64) / max(T - 1, 1)
    src_y = i[:, None] + ys[None] * (h[:, None] - 1) - oy          # [B, F] input rows
    src_x = j[:, None] + xs[None] * (w[:, None] - 1) - ox          # [B, T] input columns
    gy = 2 * src_y / max(Fb - 1, 1) - 1
    gx = 2 * src_x / max(T - 1, 1) - 1
    grid = torch.stack([gx[:, None, :].expand(B, Fb, T), gy[:, :, None].expand(B, Fb, T)], dim=-1)
    grid = grid.to(lms.device, torch.float32)
    out = F.grid_sample(lms.float(), grid, mode='bicubic', padding_mode='zeros', align_corners=True)
    return out.to(lms.dtype)
