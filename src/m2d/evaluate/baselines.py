"""The two baselines every report carries, so that a number always has context.

- **logmel**: the raw log-mel spectrogram, summarized per clip by the mean and the std of each mel
  bin over time (2 x 80 = 160-d), at the model's sample rate (`embed.logmel_embeddings`).
- **random**: an encoder of the same geometry as the weight file (input size, patch, width, depth,
  sample rate, normalization statistics), initialized as M2D initializes before pre-training
  (MAE's init, seeded) and never trained. Its embeddings are extracted exactly as the model's.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..checkpoint import Checkpoint
from ..models import _init_mae
from ..runtime import RuntimeM2D
from ..vit import ViTEncoder

log = logging.getLogger(__name__)


def random_encoder_state(ckpt: Checkpoint, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialized encoder state dict with the geometry of `ckpt` (MAE's init, seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = ViTEncoder(ckpt.vit)
        w = enc.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        torch.nn.init.normal_(enc.cls_token, std=0.02)
        for name, m in enc.named_modules():
            if name != 'patch_embed.proj':
                _init_mae(m)
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def random_runtime(runtime: RuntimeM2D, ckpt: Checkpoint, seed: int = 0) -> RuntimeM2D:
    """A RuntimeM2D of the same shape, sample rate and normalization as `runtime`, with random weights."""
    rand = dataclasses.replace(ckpt, encoder=random_encoder_state(ckpt, seed), head={}, clap={})
    out = RuntimeM2D(checkpoint=rand, bf16=runtime.bf16)
    out.norm_stats.copy_(runtime.norm_stats)
    return out


def random_identity(ckpt: Checkpoint, seed: int) -> dict:
    """What the random encoder's embeddings depend on (cache key): geometry and seed, not the weights."""
    return {'random_encoder': dataclasses.asdict(ckpt.vit), 'sample_rate': ckpt.sample_rate, 'seed': seed}
