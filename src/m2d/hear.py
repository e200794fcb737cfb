"""The HEAR 2021 API (hear-eval-kit) over RuntimeM2D.

    >>> import m2d.hear as hear
    >>> model = hear.load_model('m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth')
    >>> scene = hear.get_scene_embeddings(audio, model)          # [n_sounds, 3840]
    >>> emb, ts = hear.get_timestamp_embeddings(audio, model)    # [n, T', 3840], [n, T'] in ms
"""

from __future__ import annotations

import torch

from . import load
from .runtime import RuntimeM2D


def load_model(model_file_path: str = '', **kwargs) -> RuntimeM2D:
    """A RuntimeM2D with the attributes HEAR expects (`sample_rate`, embedding sizes)."""
    if not model_file_path:
        raise ValueError('model_file_path: give an M2D weight file or a released model name')
    model = load(model_file_path, **kwargs)
    model.scene_embedding_size = model.feature_d
    model.timestamp_embedding_size = model.feature_d
    return model


def get_scene_embeddings(audio: torch.Tensor, model: RuntimeM2D) -> torch.Tensor:
    """`audio` [n_sounds, n_samples] in [-1, 1] at `model.sample_rate` -> [n_sounds, feature_d]."""
    with torch.no_grad():
        return model.get_scene_embeddings(audio.to(model.norm_stats.device))


def get_timestamp_embeddings(audio: torch.Tensor, model: RuntimeM2D) -> tuple[torch.Tensor, torch.Tensor]:
    """`audio` [n_sounds, n_samples] -> (embeddings [n, T', feature_d], centre timestamps in ms [n, T'])."""
    with torch.no_grad():
        return model.get_timestamp_embeddings(audio.to(model.norm_stats.device))
