"""Pre-training models: MSM-MAE, M2D and M2D-S, with the official state-dict key names.

Each model IS a `m2d.vit.ViTEncoder` (the online encoder: ``patch_embed``, ``cls_token``,
``pos_embed``, ``blocks``, ``norm``), so a training checkpoint loads in `m2d.RuntimeM2D`. On top:

- MSM-MAE: ``mask_token``, ``decoder_embed``, ``decoder_pos_embed`` (fixed), ``decoder_blocks``,
  ``decoder_norm``, ``decoder_pred`` (-> pixels of a patch); loss = MSE of masked patches against
  per-patch standardized pixels.
- M2D: ``decoder_pred`` -> encoder width, predicting the masked patches; the target is the EMA
  encoder ``target_blocks``/``target_norm`` run on the masked patches (with `target_layers`, the
  mean of those blocks' outputs before ``target_norm``); loss = ``norm_mse``.
- M2D-S: M2D plus ``offline_predictor`` (``Fp*D -> off_emb_dim``) on all online tokens per time
  step, against teacher features; loss = ``loss_m2d * online + loss_off * offline``.

``norm_stats`` (mean, std of the training LMS) is a frozen ``[2]`` parameter kept in the state dict.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import DEFAULT_NORM_STATS
from .masking import MASK_TYPES, Mask, as_mask, gather_tokens, make_mask, restore_order
from .optim import param_groups  # noqa: F401  (re-exported for the trainer)
from .vit import LAYER_NORM_EPS, Block, Linear, ViTConfig, ViTEncoder, sincos_pos_embed_2d

log = logging.getLogger(__name__)

KINDS = ('msm_mae', 'm2d', 'm2d_s')
NORM_PIX_EPS = 1e-6

MaskLike = Mask | tuple[torch.Tensor, int]


# ---------------------------------------------------------------------------------------------
# losses


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-vector standardization over the last axis with the unbiased variance (+1e-6)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True)
    return (x - mean) / (var + NORM_PIX_EPS).sqrt()


def norm_mse(pred: torch.Tensor, target: torch.Tensor, norm_target: bool = True) -> torch.Tensor:
    """M2D's loss: mean over vectors of ``2 - 2 cos(pred, target)`` (target standardized first if asked)."""
    pred, target = pred.float(), target.float()
    if norm_target:
        target = standardize(target)
    cos = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)
    return (2.0 - 2.0 * cos).mean()


def mse(pred: torch.Tensor, target: torch.Tensor, norm_target: bool = True) -> torch.Tensor:
    """Mean over vectors of the per-vector MSE (target standardized first if asked)."""
    pred, target = pred.float(), target.float()
    if norm_target:
        target = standardize(target)
    return ((pred - target) ** 2).mean()


LOSSES = {'norm_mse': norm_mse, 'mse': mse}


# ---------------------------------------------------------------------------------------------
# models


def _init_mae(module: nn.Module) -> None:
    """MAE's init: xavier_uniform Linear weights, zero biases; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskedAutoencoder(ViTEncoder):
    """MSM-MAE: masked spectrogram modeling with a pixel-reconstructing decoder.

    `forward(x, mask=None, target_offline=None) -> (loss, pred, extras)`; `pred` holds every patch
    in original order ``[B, L, ph*pw*C]``.
    """

    kind = 'msm_mae'
    has_target = False

    def __init__(self, img_size: tuple[int, int] = (80, 608), patch_size: tuple[int, int] = (16, 16),
                 in_chans: int = 1, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True, layer_norm_eps: float = LAYER_NORM_EPS,
                 mask_ratio: float = 0.75, mask_type: str = 'unstructured', cont_mask: int = 0,
                 norm_stats: tuple[float, float] = DEFAULT_NORM_STATS):
        cfg = ViTConfig(input_size=tuple(img_size), patch_size=tuple(patch_size), embed_dim=embed_dim, depth=depth,
                        num_heads=num_heads, mlp_ratio=mlp_ratio, in_chans=in_chans)
        fp_rest, tp_rest = cfg.input_size[0] % cfg.patch_size[0], cfg.input_size[1] % cfg.patch_size[1]
        if fp_rest or tp_rest:
            raise ValueError(f'img_size {tuple(img_size)} is not a multiple of patch_size {tuple(patch_size)}')
        super().__init__(cfg, eps=layer_norm_eps)
        if mask_type not in MASK_TYPES:
            raise ValueError(f'mask_type must be one of {MASK_TYPES}, got {mask_type!r}')
        if mask_type == 'time_continuous' and cont_mask < 1:
            raise ValueError("mask_type 'time_continuous' needs cont_mask >= 1 (span length in time patches)")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
        self.mask_ratio = float(mask_ratio)
        self.mask_type = mask_type
        self.cont_mask = int(cont_mask)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.norm_stats = nn.Parameter(torch.tensor(norm_stats, dtype=torch.float32), requires_grad=False)

        Dd = decoder_embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_embed = Linear(embed_dim, Dd)
        dec_pos = torch.from_numpy(sincos_pos_embed_2d(Dd, cfg.grid_size, cls_token=True))[None]
        self.decoder_pos_embed = nn.Parameter(dec_pos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(Dd, decoder_num_heads, mlp_ratio, layer_norm_eps) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=layer_norm_eps)
        self.decoder_pred = Linear(Dd, self._pred_dim())

    def _pred_dim(self) -> int:
        ph, pw = self.config.patch_size
        return ph * pw * self.config.in_chans

    def init_weights(self) -> 'MaskedAutoencoder':
        """MAE's initialization (the fixed sin-cos tables are kept)."""
        w = self.patch_embed.proj.weight
        with torch.no_grad():  # in place on the parameter (not .data), so cached bf16 copies see the change
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear; the bias keeps Conv2d's default
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name != 'patch_embed.proj':
                _init_mae(m)
        return self

    def compile_blocks(self, **options: Any) -> 'MaskedAutoencoder':
        """``torch.compile`` every transformer block in place (encoder, decoder, EMA target); returns self.

        `options` go to ``nn.Module.compile`` (e.g. ``mode='max-autotune'``, ``backend='eager'``).
        State-dict keys do not change. Each block compiles on its first call (minutes on a CPU);
        shapes are static per batch geometry, which also suits CUDA graphs
        (``mode='reduce-overhead'``).
        """
        for blocks in (self.blocks, self.decoder_blocks, getattr(self, 'target_blocks', ())):
            for blk in blocks:
                blk.compile(**options)
        return self

    # ----- masks and geometry -------------------------------------------------------------------

    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(Fp, Tp')`` of an input LMS ``[B, C, F, T']``."""
        ph, pw = self.config.patch_size
        if x.dim() != 4 or x.shape[2] != self.config.input_size[0] or x.shape[3] % pw:
            raise ValueError(f'expected LMS [B, {self.config.in_chans}, {self.config.input_size[0]}, T] with T a '
                             f'multiple of {pw}, got {tuple(x.shape)}')
        return x.shape[2] // ph, x.shape[3] // pw

    def draw_mask(self, batch: int, grid_size: tuple[int, int] | None = None, device: torch.device | str | None = None,
                  generator: torch.Generator | None = None) -> Mask:
        """A random mask of this model's `mask_type` and `mask_ratio`."""
        return make_mask(self.mask_type, batch, grid_size or self.grid_size, self.mask_ratio, self.cont_mask,
                         device=device, generator=generator)

    def _resolve_mask(self, x: torch.Tensor, mask: MaskLike | None) -> Mask:
        grid = self.grid_of(x)
        if mask is None:
            return self.draw_mask(x.shape[0], grid, device=x.device)
        mask = as_mask(mask)
        if tuple(mask.ids_restore.shape) != (x.shape[0], grid[0] * grid[1]):
            raise ValueError(f'mask ids_restore has shape {tuple(mask.ids_restore.shape)}, expected '
                             f'{(x.shape[0], grid[0] * grid[1])} for input {tuple(x.shape)}')
        return mask.to(x.device)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, T]`` -> ``[B, Fp*Tp, ph*pw*C]`` (patches frequency-major, pixels ``(ph pw c)``)."""
        B, C = x.shape[:2]
        ph, pw = self.config.patch_size
        fp, tp = x.shape[2] // ph, x.shape[3] // pw
        x = x.reshape(B, C, fp, ph, tp, pw).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, fp * tp, ph * pw * C)

    def _decoder_pos(self, tp: int) -> torch.Tensor:
        fp, tp_full = self.grid_size
        if tp == tp_full:
            return self.decoder_pos_embed
        pos = self.decoder_pos_embed[:, 1:].reshape(1, fp, tp_full, -1)[:, :, :tp].reshape(1, fp * tp, -1)
        return torch.cat([self.decoder_pos_embed[:, :1], pos], dim=1)

    # ----- encoder / decoder -----------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """The online encoder on an unmasked LMS: ``[B, 1 + L, D]`` (cls first), as `ViTEncoder.forward`."""
        return ViTEncoder.forward(self, x, return_layers=return_layers)

    def _encode_masked(self, x: torch.Tensor, mask: Mask) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent ``[B, 1 + len_keep, D]``, all embedded patch tokens ``[B, L, D]``)."""
        tokens = self.embed(x)
        visible = gather_tokens(tokens, mask.ids_keep)
        latent = torch.cat([self.cls_with_pos(x.shape[0]), visible], dim=1)
        return self.run_blocks(latent), tokens

    def forward_encoder(self, x: torch.Tensor, mask: MaskLike | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Online encoder on the visible patches: ``(latent [B, 1 + len_keep, D], ids_restore, len_keep)``.

        `mask` is a `Mask` or ``(ids_restore, len_keep)``; None draws one with the model's settings.
        """
        m = self._resolve_mask(x, mask)
        latent, _ = self._encode_masked(x, m)
        return latent, m.ids_restore, m.len_keep

    def _decoder_hidden(self, latent: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Decoder blocks on the encoder output plus mask tokens: ``[B, L, Dd]`` in original order, no cls."""
        x = self.decoder_embed(latent)
        B, _, C = x.shape
        L = mask.num_patches
        filled = torch.cat([x[:, 1:], self.mask_token.expand(B, L - mask.len_keep, C).to(x.dtype)], dim=1)
        x = torch.cat([x[:, :1], restore_order(filled, mask.ids_restore)], dim=1)
        x = x + self._decoder_pos(L // self.grid_size[0])
        for blk in self.decoder_blocks:
            x = blk(x)
        return x[:, 1:]

    def forward_decoder(self, latent: torch.Tensor, mask: MaskLike) -> torch.Tensor:
        """Decoder on the encoder output plus mask tokens; returns ``[B, L, pred_dim]`` in original order."""
        return self.decoder_pred(self.decoder_norm(self._decoder_hidden(latent, as_mask(mask))))

    # ----- training step ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mask: MaskLike | None = None,
                target_offline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Loss, predictions of every patch (original order) and extras {'ids_restore', 'len_keep'}."""
        m = self._resolve_mask(x, mask)
        latent, _ = self._encode_masked(x, m)
        pred = self.forward_decoder(latent, m)
        target = self.patchify(x)
        if self.norm_pix_loss:
            target = standardize(target.float())
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        binary = m.binary()
        loss = (per_patch * binary).sum() / binary.sum()
        return loss, pred, {'ids_restore': m.ids_restore, 'len_keep': m.len_keep}

    def update_target(self, decay: float) -> None:
        """EMA of the online encoder into the target (no-op: MSM-MAE has no target)."""


class M2D(MaskedAutoencoder):
    """Masked Modeling Duo: predict the EMA target encoder's features of the masked patches.

    `pred` holds the masked patches only ``[B, L - len_keep, D]``, in the order ``ids_masked``.
    """

    kind = 'm2d'
    has_target = True

    def __init__(self, *, loss_type: str = 'norm_mse', mask_ratio: float = 0.7,
                 target_layers: tuple[int, ...] | list[int] | None = None, **kwargs):
        if loss_type not in LOSSES:
            raise ValueError(f'loss_type must be one of {sorted(LOSSES)}, got {loss_type!r}')
        super().__init__(mask_ratio=mask_ratio, **kwargs)
        self.loss_type = loss_type
        cfg, eps = self.config, self.norm.eps
        self.target_layers = tuple(int(i) for i in target_layers) if target_layers else None
        if self.target_layers and not all(0 <= i < cfg.depth for i in self.target_layers):
            raise ValueError(f'target_layers {self.target_layers}: block indices must be in [0, {cfg.depth})')
        self.target_blocks = nn.ModuleList(
            [Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.depth)])
        self.target_norm = nn.LayerNorm(cfg.embed_dim, eps=eps)
        self.target_blocks.requires_grad_(False)
        self.target_norm.requires_grad_(False)

    def _pred_dim(self) -> int:
        return self.config.embed_dim

    def target_parameters(self) -> list[nn.Parameter]:
        return [*self.target_blocks.parameters(), *self.target_norm.parameters()]

    def online_parameters(self) -> list[nn.Parameter]:
        """The online tensors the target follows, in the same order as `target_parameters`."""
        return [*self.blocks.parameters(), *self.norm.parameters()]

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """``target <- decay * target + (1 - decay) * online``, one fused lerp over all tensors."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f'EMA decay must be in [0, 1], got {decay}')
        torch._foreach_lerp_(self.target_parameters(), self.online_parameters(), 1.0 - float(decay))

    @torch.no_grad()
    def forward_target(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target encoder on embedded patch tokens ``[B, N, D]`` (with the online cls); cls dropped.

        With `target_layers`, the outputs of those blocks are averaged before ``target_norm``.
        """
        x = torch.cat([self.cls_with_pos(tokens.shape[0]).to(tokens.dtype), tokens.detach()], dim=1)
        picked = []
        for i, blk in enumerate(self.target_blocks):
            x = blk(x)
            if self.target_layers and i in self.target_layers:
                picked.append(x)
        if picked:
            x = torch.stack(picked).mean(0)
        return self.target_norm(x)[:, 1:]

    def _online_step(self, x: torch.Tensor, mask: MaskLike | None):
        m = self._resolve_mask(x, mask)
        latent, tokens = self._encode_masked(x, m)
        ids_masked = m.ids_masked
        # norm and prediction head are per token: apply them to the masked tokens only
        pred = self.decoder_pred(self.decoder_norm(gather_tokens(self._decoder_hidden(latent, m), ids_masked)))
        target = self.forward_target(gather_tokens(tokens, ids_masked))
        loss = LOSSES[self.loss_type](pred, target, self.norm_pix_loss)
        return m, latent, pred, loss

    def forward(self, x: torch.Tensor, mask: MaskLike | None = None,
                target_offline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Loss, predictions of the masked patches, extras {'ids_restore', 'len_keep'}."""
        m, _, pred, loss = self._online_step(x, mask)
        return loss, pred, {'ids_restore': m.ids_restore, 'len_keep': m.len_keep}


class M2DS(M2D):
    """M2D for speech (M2D-S / M2D-X): M2D plus an offline target (teacher features per time step)."""

    kind = 'm2d_s'

    def __init__(self, *, off_emb_dim: int = 768, loss_m2d: float = 1.0, loss_off: float = 1.0,
                 mask_ratio: float = 0.6, offline_init: str = 'xavier', **kwargs):
        if offline_init not in ('xavier', 'torch'):
            raise ValueError(f"offline_init must be 'xavier' or 'torch', got {offline_init!r}")
        super().__init__(mask_ratio=mask_ratio, **kwargs)
        self.loss_m2d = float(loss_m2d)
        self.loss_off = float(loss_off)
        self.offline_init = offline_init
        fp = self.grid_size[0]
        self.offline_predictor = Linear(fp * self.config.embed_dim, off_emb_dim)

    def init_weights(self) -> 'M2DS':
        """MAE's initialization; the offline predictor keeps PyTorch's Linear default with
        ``offline_init='torch'`` (the reference's M2D-S; its M2D-X uses xavier as the rest)."""
        super().init_weights()
        if self.offline_init == 'torch':
            self.offline_predictor.reset_parameters()
        return self

    def forward(self, x: torch.Tensor, mask: MaskLike | None = None,
                target_offline: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Loss, masked-patch predictions, extras {'loss_online', 'loss_offline', 'ids_restore', 'len_keep'}.

        `target_offline` ``[B, Tp, off_emb_dim]``: teacher features, one per time patch. Without it
        only the online loss is used (allowed only when ``loss_off == 0``).
        """
        m, latent, pred, loss_online = self._online_step(x, mask)
        extras: dict[str, Any] = {'ids_restore': m.ids_restore, 'len_keep': m.len_keep,
                                  'loss_online': loss_online.detach()}
        if target_offline is None:
            if self.loss_off:
                raise ValueError(f'm2d_s with loss_off={self.loss_off} needs target_offline (teacher features)')
            return self.loss_m2d * loss_online, pred, extras
        B, L, D = pred.shape[0], m.num_patches, pred.shape[-1]
        fp = self.grid_size[0]
        tp = L // fp
        if target_offline.dim() != 3 or target_offline.shape[:2] != (B, tp):
            raise ValueError(f'target_offline must be [B={B}, Tp={tp}, {self.offline_predictor.out_features}] '
                             f'(one teacher vector per time patch), got {tuple(target_offline.shape)}')
        dtype = torch.promote_types(latent.dtype, pred.dtype)
        tokens = restore_order(torch.cat([latent[:, 1:].to(dtype), pred.to(dtype)], dim=1), m.ids_restore)
        per_step = tokens.reshape(B, fp, tp, D).transpose(1, 2).reshape(B, tp, fp * D)  # b (f t) d -> b t (f d)
        off_pred = self.offline_predictor(per_step)
        loss_offline = LOSSES[self.loss_type](off_pred, target_offline, self.norm_pix_loss)
        extras['loss_offline'] = loss_offline.detach()
        return self.loss_m2d * loss_online + self.loss_off * loss_offline, pred, extras


_CLASSES = {'msm_mae': MaskedAutoencoder, 'm2d': M2D, 'm2d_s': M2DS}


def create_model(kind: str, **config: Any) -> MaskedAutoencoder:
    """Build a pre-training model, MAE-initialized.

    `kind` is 'msm_mae', 'm2d' or 'm2d_s'; `config` uses the training fixtures' keys (img_size,
    patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
    decoder_num_heads, mlp_ratio, norm_pix_loss, layer_norm_eps, mask_ratio, loss_type, loss_m2d,
    loss_off, off_emb_dim) plus mask_type, cont_mask and norm_stats (default: the reference's
    (-7.1, 4.2); the trainer sets the dataset's statistics). Keys that do not apply to
    `kind` (e.g. loss_type for msm_mae) are ignored with a debug log; unknown keys are an error.
    """
    if kind not in _CLASSES:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    known = {'img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth', 'num_heads', 'decoder_embed_dim',
             'decoder_depth', 'decoder_num_heads', 'mlp_ratio', 'norm_pix_loss', 'layer_norm_eps', 'mask_ratio',
             'mask_type', 'cont_mask', 'norm_stats', 'loss_type', 'loss_m2d', 'loss_off', 'off_emb_dim',
             'target_layers', 'offline_init'}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f'create_model({kind!r}): unknown config keys {unknown}')
    per_kind = {'msm_mae': {'loss_type', 'loss_m2d', 'loss_off', 'off_emb_dim', 'target_layers', 'offline_init'},
                'm2d': {'loss_m2d', 'loss_off', 'off_emb_dim', 'offline_init'}, 'm2d_s': set()}[kind]
    ignored = sorted(set(config) & per_kind)
    if ignored:
        log.debug('create_model(%r): ignoring %s', kind, ignored)
    kwargs = {k: v for k, v in config.items() if k not in per_kind}
    return _CLASSES[kind](**kwargs).init_weights()
