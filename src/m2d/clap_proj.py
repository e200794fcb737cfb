"""M2D-CLAP's semantic audio projector (the 2025 files, e.g. ``m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025``).

Instead of an MLP on the mean of the patch features, a small transformer reads all patch features
with a learned semantic token prepended and returns that token's output, layer-normalized (the
reference's ``AudioToSemantic``: timm blocks with one head, ``qkv_bias``, LayerNorm eps 1e-5, no
positional embedding). Its depth and MLP width come from the weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .vit import Block

SEMANTIC_EPS = 1e-5  # torch.nn.LayerNorm's default, which the reference passes as the norm layer
SEMANTIC_HEADS = 1   # every sem_mode of the reference uses one head


class AudioToSemantic(nn.Module):
    """Patch features ``[B, N, D]`` -> one semantic vector ``[B, D]``."""

    def __init__(self, embed_dim: int, depth: int, mlp_ratio: float):
        super().__init__()
        self.sem_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.sem_blocks = nn.ModuleList([Block(embed_dim, SEMANTIC_HEADS, mlp_ratio, eps=SEMANTIC_EPS)
                                         for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=SEMANTIC_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sem_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.sem_blocks:
            x = block(x)
        return self.norm(x[:, 0])


def semantic_audio_proj(state: dict[str, torch.Tensor], prefix: str = 'audio_proj') -> AudioToSemantic | None:
    """The projector saved under `prefix` (``sem_token``, ``sem_blocks.N.*``, ``norm.*``), or None."""
    if f'{prefix}.sem_token' not in state:
        return None
    sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + '.')}
    D = sub['sem_token'].shape[-1]
    depth = 1 + max(int(k.split('.')[1]) for k in sub if k.startswith('sem_blocks.'))
    mlp_ratio = sub['sem_blocks.0.mlp.fc1.weight'].shape[0] / D
    proj = AudioToSemantic(D, depth, mlp_ratio)
    proj.load_state_dict(sub, strict=True)
    return proj
