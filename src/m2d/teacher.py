"""The M2D-X teacher: a frozen M2D whose features of its input are the offline training target.

M2D-X uses any M2D model as the teacher, at training time (`runtime_teacher`). The offline HuBERT
teacher of M2D-S lives with the data code: `m2d.data.teacher_features`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


class RuntimeTeacher(nn.Module):
    """A frozen `RuntimeM2D` whose ``encode_lms`` of its input is the offline target.

    Call it with a normalized LMS ``[B, 1, 80, T]`` (M2D-X's default: the noise mixture); returns
    ``[B, T', D]`` (no gradient).
    With `frames`, the time axis is averaged (or repeated) to that many steps, e.g. the student's
    Tp when teacher and student patch widths differ.
    By default the input goes to the teacher as is (the student-normalized LMS, as the reference's
    loop does). If `input_norm_stats` (the student's mean, std) is given, the input is first
    re-normalized to the teacher's own ``norm_stats`` (``m2d pretrain --teacher_renorm``).
    """

    def __init__(self, runtime: nn.Module, input_norm_stats: Sequence[float] | None = None):
        super().__init__()
        self.runtime = runtime.eval().requires_grad_(False)
        self.input_norm_stats = None if input_norm_stats is None else tuple(float(v) for v in input_norm_stats)

    def train(self, mode: bool = True) -> RuntimeTeacher:  # always frozen in eval mode
        return super().train(False)

    @property
    def feature_d(self) -> int:
        return self.runtime.feature_d

    @torch.no_grad()
    def forward(self, lms: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        x = lms.to(self.runtime.norm_stats.device).float()
        if self.input_norm_stats is not None:
            mean, std = self.input_norm_stats
            x = self.runtime.normalize_batch(x * std + mean)
        y = self.runtime.encode_lms(x)
        if frames is not None and y.shape[1] != frames:
            y = match_frames(y, frames)
        return y


def match_frames(y: torch.Tensor, frames: int) -> torch.Tensor:
    """Resample ``[B, T, D]`` features to `frames` steps: averages when shrinking, repeats when growing."""
    t = y.shape[1]
    if t > frames:
        return F.adaptive_avg_pool1d(y.transpose(1, 2), frames).transpose(1, 2)
    idx = torch.div(torch.arange(frames, device=y.device) * t, frames, rounding_mode='floor')
    return y[:, idx]


def runtime_teacher(weights: str | Path, device: str | torch.device = 'cpu',
                    input_norm_stats: Sequence[float] | None = None, trust: bool = False) -> Callable:
    """M2D-X offline teacher: callable(lms ``[B, 1, 80, T]``) -> ``[B, T', D]``, frozen, on `device`."""
    from .runtime import RuntimeM2D

    rt = RuntimeM2D(weights, trust=trust)
    log.info('M2D-X teacher: %s (feature_d %d)', weights, rt.feature_d)
    return RuntimeTeacher(rt, input_norm_stats).to(device)
