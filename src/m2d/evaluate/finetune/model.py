"""The fine-tuned network: `RuntimeM2D` (front-end + encoder) and EVAR's ``TaskHead``, with the
training-time augmentations and the structured patch mask."""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...checkpoint import Checkpoint
from ...masking import gather_tokens, structured_training_mask
from ...runtime import RuntimeM2D
from ...vit import resize_time_positions
from ..augment import random_resize_crop, spec_mask

log = logging.getLogger(__name__)


def checkpoint_for_frames(ckpt: Checkpoint, dur_frames: int) -> Checkpoint:
    """`ckpt` as an encoder of ``dur_frames`` input frames (the reference's ``dur_frames``): its
    ``pos_embed`` trimmed to the first time columns for fewer, bicubically resampled for more
    (`vit.resize_time_positions`); the model's name then carries the new length (e.g. 80x1001)."""
    vit = ckpt.vit
    pw = vit.patch_size[1]
    if dur_frames < pw:
        raise ValueError(f'--dur_frames {dur_frames}: shorter than one patch ({pw} frames)')
    grid, new_tp = vit.grid_size, dur_frames // pw
    encoder = dict(ckpt.encoder)
    encoder['pos_embed'] = resize_time_positions(encoder['pos_embed'], grid, new_tp)
    how = 'kept' if new_tp == grid[1] else 'trimmed' if new_tp < grid[1] else 'resampled (bicubic)'
    log.info('dur_frames %d: pos_embed %s from %dx%d to %dx%d patches', dur_frames, how, *grid, grid[0], new_tp)
    new_vit = dataclasses.replace(vit, input_size=(vit.input_size[0], int(dur_frames)))
    return dataclasses.replace(ckpt, vit=new_vit, encoder=encoder)


def fit_frames(lms: torch.Tensor, frames: int) -> torch.Tensor:
    """``[..., T]`` cropped from the start or zero-padded on the right to `frames` (EVAR's AudioSet
    dataset pads its log-mel clips with 0 the same way)."""
    t = lms.shape[-1]
    if t > frames:
        return lms[..., :frames]
    if t < frames:
        return F.pad(lms, (0, frames - t))
    return lms


class EvarHead(nn.Module):
    """EVAR's ``TaskHead``: ``BatchNorm1d(D, affine=False)`` then ``Linear(D, C)``, same key names
    (``norm.*``, ``mlp.mlp.0.*``); the Linear starts at N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        linear = nn.Linear(dim, num_classes)
        nn.init.normal_(linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(linear.bias)
        self.mlp = nn.ModuleDict({'mlp': nn.Sequential(linear)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clip features ``[B, D]`` -> logits ``[B, C]``."""
        return self.mlp['mlp'](self.norm(x))


class FinetuneModel(nn.Module):
    """`RuntimeM2D` (front-end + encoder) and an `EvarHead`, with the training-time extras.

    Args:
        checkpoint: the encoder's weights (any file `load_checkpoint` reads).
        num_classes: head outputs.
        training_mask: ratio of the structured patch mask applied while training (flat features).
        norm_stats: (mean, std) used to normalize the log-mel input; default the checkpoint's.
        dur_frames: the reference's ``dur_frames``: the encoder takes this many frames
            (`checkpoint_for_frames`) and every input is cropped or padded to them (`fit_frames`).
        freeze_embed: the reference's ``freeze_embed``: the patch embedding takes no gradient.
    """

    def __init__(self, checkpoint: Checkpoint, num_classes: int, training_mask: float = 0.0,
                 norm_stats: tuple[float, float] | None = None, dur_frames: int | None = None,
                 freeze_embed: bool = False):
        super().__init__()
        if dur_frames is not None and checkpoint.vit.input_size[1] != dur_frames:
            checkpoint = checkpoint_for_frames(checkpoint, dur_frames)
        self.dur_frames = dur_frames
        self.runtime = RuntimeM2D(checkpoint=checkpoint, flat_features=training_mask > 0)
        if freeze_embed:
            self.runtime.backbone.patch_embed.requires_grad_(False)
        self.freeze_embed = bool(freeze_embed)
        if norm_stats is not None:
            self.runtime.norm_stats.copy_(torch.tensor(norm_stats, dtype=torch.float32))
        self.training_mask = float(training_mask)
        self.head = EvarHead(self.runtime.feature_d, num_classes)
        # Augmentations of the normalized LMS while training; set by `finetune`.
        self.freq_mask, self.time_mask, self.rrc = 0, 0, False
        self.generator: torch.Generator | None = None

    def augment(self, lms: torch.Tensor) -> torch.Tensor:
        """SpecAugment then random resize crop (EVAR's order), as configured."""
        if self.freq_mask or self.time_mask:
            lms = spec_mask(lms, self.freq_mask, self.time_mask, self.generator)
        if self.rrc:
            lms = random_resize_crop(lms, self.generator)
        return lms

    def _encode_masked(self, lms: torch.Tensor) -> torch.Tensor:
        """Encode ``[B, 1, F, T]`` keeping, per model-length chunk, the patches of a structured training
        mask (`structured_training_mask`: those the reference's runtime keeps); returns the kept patch
        features ``[B, N_kept, D]`` of all chunks."""
        backbone, cfg = self.runtime.backbone, self.runtime.cfg
        unit, pw = cfg.input_size[1], cfg.patch_size[1]
        used = cfg.grid_size[1] * pw  # the unit's frames in whole patches (992 of a 1001-frame unit)
        n_full, rest = divmod(lms.shape[-1], unit)
        chunks = [lms[..., c * unit:c * unit + used] for c in range(n_full)]
        if rest:  # padded to whole patches, never past the unit's (as `RuntimeM2D.encode_lms`)
            chunks.append(F.pad(lms[..., n_full * unit:], (0, (pw - rest % pw) % pw))[..., :used])
        B, outs = lms.shape[0], []
        for chunk in chunks:
            x = backbone.embed(chunk)                                   # [B, Fp*Tp', D]
            grid = (cfg.grid_size[0], x.shape[1] // cfg.grid_size[0])
            mask = structured_training_mask(B, grid, self.training_mask, device=x.device, generator=self.generator)
            x = gather_tokens(x, mask.ids_keep)
            x = backbone.run_blocks(torch.cat([backbone.cls_with_pos(B), x], dim=1))
            outs.append(x[:, 1:])
        return torch.cat(outs, dim=1)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]``, or log-mel clips ``[B, F, T]`` / ``[B, 1, F, T]`` (EVAR's AudioSet
        .npy files) -> log-mel ``[B, 1, F, T]``, cropped/padded to ``dur_frames`` when set."""
        lms = self.runtime.to_feature(x) if x.dim() == 2 else (x[:, None] if x.dim() == 3 else x)
        return fit_frames(lms, self.dur_frames) if self.dur_frames is not None else lms

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` (or log-mel clips, see `log_mel`) -> clip features ``[B, feature_d]``
        (augmented and masked in train mode)."""
        lms = self.runtime.normalize_batch(self.log_mel(wav))
        if self.training:
            lms = self.augment(lms)
            if self.training_mask > 0:
                return self._encode_masked(lms).mean(1)
        return self.runtime.encode_lms(lms).mean(1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` -> logits ``[B, C]`` (the head runs in float32)."""
        return self.head(self.features(wav).float())
