"""The fine-tuned network: `RuntimeM2D` (front-end + encoder) and EVAR's ``TaskHead``, with the
training-time augmentations and the structured patch mask."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...checkpoint import Checkpoint
from ...masking import gather_tokens, structured_mask
from ...runtime import RuntimeM2D
from ..augment import random_resize_crop, spec_mask

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
    """

    def __init__(self, checkpoint: Checkpoint, num_classes: int, training_mask: float = 0.0,
                 norm_stats: tuple[float, float] | None = None):
        super().__init__()
        self.runtime = RuntimeM2D(checkpoint=checkpoint, flat_features=training_mask > 0)
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
        """Encode ``[B, 1, F, T]`` dropping a structured mask of patches per model-length chunk;
        returns the visible patch features ``[B, N_visible, D]`` of all chunks."""
        backbone, cfg = self.runtime.backbone, self.runtime.cfg
        unit, pw = cfg.input_size[1], cfg.patch_size[1]
        used = cfg.grid_size[1] * pw
        chunks = [lms[..., s:s + unit][..., :used] for s in range(0, lms.shape[-1] - lms.shape[-1] % unit, unit)]
        rest = lms.shape[-1] % unit
        if rest:
            chunks.append(F.pad(lms[..., lms.shape[-1] - rest:], (0, (pw - rest % pw) % pw)))
        B, outs = lms.shape[0], []
        for chunk in chunks:
            x = backbone.embed(chunk)                                   # [B, Fp*Tp', D]
            grid = (cfg.grid_size[0], x.shape[1] // cfg.grid_size[0])
            mask = structured_mask(B, grid, self.training_mask, device=x.device, generator=self.generator)
            x = gather_tokens(x, mask.ids_keep)
            x = backbone.run_blocks(torch.cat([backbone.cls_with_pos(B), x], dim=1))
            outs.append(x[:, 1:])
        return torch.cat(outs, dim=1)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` -> clip features ``[B, feature_d]`` (augmented and masked in train mode)."""
        lms = self.runtime.normalize_batch(self.runtime.to_feature(wav))
        if self.training:
            lms = self.augment(lms)
            if self.training_mask > 0:
                return self._encode_masked(lms).mean(1)
        return self.runtime.encode_lms(lms).mean(1)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[B, samples]`` -> logits ``[B, C]`` (the head runs in float32)."""
        return self.head(self.features(wav).float())
