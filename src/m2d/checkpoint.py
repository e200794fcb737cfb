"""Reading, checking and writing M2D weight files.

Every released family is read by one loader: full pre-training checkpoints
(``{'model': state_dict, 'epoch', 'args'}``), encoder-only files (bare state dicts), EVAR fine-tuned
files (``module.ar.runtime.backbone.*`` + ``module.head.*``), M2D-S/X/AS (``offline_predictor``),
M2D-CLAP (``audio_proj``/``text_proj``/``logit_scale``), and safetensors exports of any of them.

Loading never runs code from the file: pickles go through ``torch.load(weights_only=True)`` with
only ``argparse.Namespace`` and plain data (numpy scalars/arrays/dtypes, paths) allow-listed; anything
else needs an explicit ``trust=True``.

`load_checkpoint` maps the file instead of reading it (``torch.load(mmap=True)``; safetensors maps
by design): a tensor's bytes are read from disk when it is first used, so the decoder, the EMA target
and the optimizer state of a training checkpoint are never read at all. The map is private
(copy-on-write: writing into a loaded tensor never reaches the file) and stays valid when the file
is replaced by rename, as every writer here does. Modules take copies (``load_state_dict`` copies),
so the map is released with the `Checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import M2DError
from .fileio import atomic_path
from .vit import WIDTHS, ViTConfig, sincos_pos_embed_2d

log = logging.getLogger(__name__)

DEFAULT_NORM_STATS = (-7.1, 4.2)  # the 2022 releases carry no norm_stats
EVAR_BACKBONE_PREFIX = 'module.ar.runtime.backbone.'
EVAR_HEAD_PREFIX = 'module.head.'
RUNTIME_BACKBONE_PREFIX = 'backbone.'  # a reference RuntimeM2D's state dict (the M2D-CLAP 2025 release)
ENCODER_PREFIXES = ('patch_embed.', 'cls_token', 'pos_embed', 'blocks.', 'norm.')
CLAP_PREFIXES = ('audio_proj.', 'text_proj.', 'logit_scale')
TEXT_ENCODER_PREFIX = 'text_encoder.'  # M2D-CLAP files named ...pTI carry their text encoder
TRAINING_ONLY_PREFIXES = ('decoder_', 'mask_token', 'target_', 'offline_predictor')

_NAME_RE = re.compile(
    r'^(?P<model>[A-Za-z0-9_]+)-(?P<f>\d+)x(?P<t>\d+)p(?P<ph>\d+)x(?P<pw>\d+)(?:p(?P<sr>\d+)k)?'
    r'(?P<extra>(?:p[A-Za-z][A-Za-z0-9]*)*)(?=-|_|$)')


class CheckpointError(M2DError, ValueError):
    """A weight file that cannot be loaded as asked; the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs more than plain tensors and argparse.Namespace to load."""


@dataclass(frozen=True)
class ModelName:
    """What a checkpoint folder name says: ``MODEL-FxTpPHxPW[pSRk][pX...]-...``.

    `extra`: the letters after the sample rate, e.g. ``('B', 'TI')`` of M2D-CLAP's
    ``80x1001p16x16p16kpBpTI`` (the text encoder type, and that its weights are in the file).
    """

    model: str
    input_size: tuple[int, int]
    patch_size: tuple[int, int]
    sample_rate: int = 16000
    extra: tuple[str, ...] = ()

    @property
    def width(self) -> str | None:
        """'tiny', 'small', 'base' or 'large' when the model name says so."""
        for w in WIDTHS:
            if f'vit_{w}' in self.model:
                return w
        return None

    def format(self) -> str:
        """The geometry part of a folder name, e.g. ``m2d_vit_base-80x608p16x16p16k``."""
        (f, t), (ph, pw) = self.input_size, self.patch_size
        extra = ''.join(f'p{e}' for e in self.extra)
        return f'{self.model}-{f}x{t}p{ph}x{pw}p{self.sample_rate // 1000}k{extra}'


def parse_model_name(name: str) -> ModelName | None:
    """Parse a checkpoint folder name such as ``m2d_vit_base-80x608p16x16-221006-mr7``; None if it is not one."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    sr = int(m['sr']) * 1000 if m['sr'] else 16000
    extra = tuple(m['extra'].split('p')[1:]) if m['extra'] else ()
    return ModelName(m['model'], (int(m['f']), int(m['t'])), (int(m['ph']), int(m['pw'])), sr, extra)


def name_from_path(path: str | Path) -> ModelName | None:
    """The model name of a weight file: its folder's name, else its own stem."""
    path = Path(path)
    return parse_model_name(path.parent.name) or parse_model_name(path.stem)


# ---------------------------------------------------------------------------------------------
# reading


def _safe_globals() -> list[Any]:
    """What a weight file may contain besides tensors: ``argparse.Namespace`` (released files carry
    the training args) and plain data that such args hold: numpy scalars/arrays/dtypes, paths."""
    import pathlib

    import numpy as np

    core = getattr(np, '_core', None) or np.core
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64, np.complex64, np.complex128, np.str_)
    return [argparse.Namespace, np.dtype, np.ndarray, core.multiarray._reconstruct, core.multiarray.scalar,
            *{type(np.dtype(k)) for k in kinds}, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]


def _unsafe_reason(message: str) -> str | None:
    """What ``torch.load(weights_only=True)`` refused, from its error message; None if it was no refusal."""
    if 'Weights only load failed' not in message:
        return None
    m = re.search(r'Unsupported global: GLOBAL (\S+)', message)
    if m:
        return f'it needs {m[1]}'
    m = re.search(r'Unsupported operand \d+', message)
    return f'the safe loader does not support it: {m[0]}' if m else 'it needs more than tensors and argparse.Namespace'


def _load(path: Path, weights_only: bool, mmap: bool) -> Any:
    """``torch.load`` on CPU; `mmap` falls back to reading the file when it is in the legacy
    (pre-1.6, non-zip) format, which cannot be mapped."""
    if mmap:
        try:
            return torch.load(path, map_location='cpu', weights_only=weights_only, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e) or 'zipfile' not in str(e):
                raise
            log.debug('%s: a legacy torch file; read whole (no mmap)', path)
    return torch.load(path, map_location='cpu', weights_only=weights_only)


def torch_load(path: str | Path, trust: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` on CPU that refuses to run code unless `trust` is set.

    mmap: map the file (tensors are read from disk when first used; the map is private, so writing
    into a tensor never changes the file). Leave it off for state that is updated in place for long
    (optimizer moments): each written page becomes a private copy anyway.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such weight file')
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return _load(path, True, mmap)
    except Exception as e:  # torch raises many types for files that are not its own (KeyError, EOFError, ...)
        reason = _unsafe_reason(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if reason is None:
            detail = re.sub(r'\x1b\[[0-9;]*m', '', str(e)).strip().splitlines()
            raise CheckpointError(f'{path}: not a readable PyTorch weight file '
                                  f'({type(e).__name__}: {detail[0] if detail else "empty"})') from None
    if not trust:
        raise UnsafeCheckpointError(
            f'{path}: refused to load: unpickling the file would import code ({reason}). A pickle can run code; '
            'load it only if you trust its source, with trust=True (CLI: --trust).')
    log.warning('%s: loading with weights_only=False because trust=True', path)
    try:
        return _load(path, False, mmap)
    except Exception as e:
        raise CheckpointError(f'{path}: could not load the file even with trust=True ({type(e).__name__}: {e})') from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from None


def read_state_dict(path: str | Path, trust: bool = False, mmap: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The flat state dict of any supported file, plus metadata (epoch, args, safetensors metadata).

    mmap: the tensors of a ``.pth`` are views of a private map of the file (see `torch_load`): only
    the tensors used are ever read, and the optimizer state or anything else beside the weights is
    dropped unread. Copy them into modules (``load_state_dict`` does).
    """
    path = Path(path)
    if path.suffix == '.safetensors':
        sd, meta = read_safetensors(path)
        return sd, {'metadata': meta}
    obj = torch_load(path, trust=trust, mmap=mmap)
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: expected a state dict or {{"model": state_dict}}, got {type(obj).__name__}')
    meta = {k: v for k, v in obj.items() if not isinstance(v, (dict, torch.Tensor))}
    if isinstance(obj.get('model'), dict):
        sd = obj['model']
    elif isinstance(obj.get('state_dict'), dict):
        sd = obj['state_dict']
    else:
        sd = obj
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f'{path}: the file holds no tensors')
    return sd, meta


def normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (EVAR's ``module.ar.runtime.backbone.``, DDP's ``module.``, a reference
    RuntimeM2D's ``backbone.``); EVAR heads become ``head.*``."""
    runtime_format = f'{RUNTIME_BACKBONE_PREFIX}patch_embed.proj.weight' in sd
    out = {}
    for k, v in sd.items():
        if runtime_format and k.startswith(RUNTIME_BACKBONE_PREFIX):
            k = k[len(RUNTIME_BACKBONE_PREFIX):]
        elif k.startswith(EVAR_BACKBONE_PREFIX):
            k = k[len(EVAR_BACKBONE_PREFIX):]
        elif k.startswith(EVAR_HEAD_PREFIX):
            k = 'head.' + k[len(EVAR_HEAD_PREFIX):]
        elif k.startswith('module.'):
            k = k[len('module.'):]
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# geometry


def _depth(sd: dict[str, torch.Tensor], prefix: str = 'blocks.') -> int:
    idx = {int(k[len(prefix):].split('.')[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_vit_config(sd: dict[str, torch.Tensor], name: ModelName | None, source: str) -> ViTConfig:
    """Encoder geometry from the tensors, checked against what the folder name says."""
    if 'patch_embed.proj.weight' not in sd:
        raise CheckpointError(f'{source}: no patch_embed.proj.weight; not an M2D encoder '
                              f'(keys start with: {sorted(sd)[:5]})')
    D, in_chans, ph, pw = sd['patch_embed.proj.weight'].shape
    depth = _depth(sd)
    if depth == 0:
        raise CheckpointError(f'{source}: no encoder blocks (blocks.N.*) in the file')
    F = name.input_size[0] if name else 80
    if name and name.patch_size != (ph, pw):
        raise CheckpointError(f'{source}: the name says patch {name.patch_size[0]}x{name.patch_size[1]} '
                              f'but patch_embed.proj.weight has patch {ph}x{pw}')
    if F % ph:
        raise CheckpointError(f'{source}: {F} frequency bins are not a multiple of the patch height {ph}')
    fp = F // ph
    if 'pos_embed' in sd:
        n_tokens = sd['pos_embed'].shape[1] - 1
        if n_tokens % fp:
            raise CheckpointError(f'{source}: pos_embed has {n_tokens} patch positions, not a multiple of '
                                  f'{fp} frequency patches')
        tp = n_tokens // fp
        # Compare whole time patches: 80x1001p16x16 holds 62 columns (the conv drops the last 9 frames).
        if name and name.input_size[1] // pw != tp:
            raise CheckpointError(f'{source}: the name says input {name.input_size[0]}x{name.input_size[1]} '
                                  f'({name.input_size[1] // pw} time patches of {pw} frames) but pos_embed has '
                                  f'positions for {F}x{tp * pw} ({tp} time patches)')
        T = name.input_size[1] if name else tp * pw
    elif name:
        T = name.input_size[1]
    else:
        raise CheckpointError(f'{source}: no pos_embed and no model name (FxTpPHxPW) to derive the input size from')
    width = name.width if name else None
    heads = WIDTHS[width][2] if width and WIDTHS[width][0] == D else max(1, D // 64)
    mlp_hidden = sd['blocks.0.mlp.fc1.weight'].shape[0]
    return ViTConfig(input_size=(F, T), patch_size=(ph, pw), embed_dim=D, depth=depth, num_heads=heads,
                     mlp_ratio=mlp_hidden / D, in_chans=in_chans)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class Checkpoint:
    """An M2D weight file split into what each consumer needs."""

    path: Path
    vit: ViTConfig
    sample_rate: int
    norm_stats: tuple[float, float]
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    clap: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)  # ``text_encoder.`` stripped
    dropped: list[str] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    model_name: str = ''
    name_extra: tuple[str, ...] = ()  # e.g. ('B', 'TI'): see ModelName.extra

    @property
    def has_norm_stats(self) -> bool:
        return 'norm_stats' in self.state_dict


def load_checkpoint(path: str | Path, trust: bool = False, mmap: bool = True) -> Checkpoint:
    """Read and check any released M2D weight file (or one of ours).

    mmap (default): the tensors are views of a private map of the file, read from disk when first
    used; what encoding does not use (decoder, EMA target, optimizer state) is never read. Copy
    them into a module (``load_state_dict``) rather than keeping them as parameters.
    """
    path = Path(path)
    sd, meta = read_state_dict(path, trust=trust, mmap=mmap)
    sd = normalize_keys(sd)
    st_meta = meta.get('metadata', {})
    m2d_name = st_meta.get('m2d_name') or meta.get('m2d_name')  # safetensors metadata, or a key of a fine-tuned .pth
    name = (parse_model_name(m2d_name) if isinstance(m2d_name, str) else None) or name_from_path(path)
    if name is None:
        log.warning('%s: the folder name does not encode the model (MODEL-FxTpPHxPW-...); geometry is taken '
                    'from the tensors and the sample rate is assumed to be 16 kHz', path)
    vit = infer_vit_config(sd, name, str(path))
    sample_rate = name.sample_rate if name else 16000

    if 'norm_stats' in sd:
        norm_stats = tuple(float(v) for v in sd['norm_stats'].flatten()[:2])
    else:
        norm_stats = DEFAULT_NORM_STATS
        log.info('%s: no norm_stats in the file; using the 2022 defaults mean=%s std=%s', path, *norm_stats)

    encoder, head, clap, text_encoder, dropped = {}, {}, {}, {}, []
    for k, v in sd.items():
        if k.startswith(ENCODER_PREFIXES):
            encoder[k] = v
        elif k.startswith('head.'):
            head[k[len('head.'):]] = v
        elif k.startswith(CLAP_PREFIXES):
            clap[k] = v
        elif k.startswith(TEXT_ENCODER_PREFIX):
            text_encoder[k[len(TEXT_ENCODER_PREFIX):]] = v
        elif k != 'norm_stats':
            dropped.append(k)
    if 'pos_embed' not in encoder:
        log.warning('%s: no pos_embed; using the fixed 2-D sin-cos table for %s', path, vit.input_size)
        encoder['pos_embed'] = torch.from_numpy(sincos_pos_embed_2d(vit.embed_dim, vit.grid_size))[None]
    if dropped:
        groups = sorted({k.split('.')[0] for k in dropped})
        log.info('%s: using %d encoder tensors; dropped %d not used for encoding (%s)',
                 path.name, len(encoder), len(dropped), ', '.join(groups))
    return Checkpoint(path=path, vit=vit, sample_rate=sample_rate, norm_stats=norm_stats, encoder=encoder,
                      head=head, clap=clap, text_encoder=text_encoder, dropped=dropped, state_dict=sd, meta=meta,
                      model_name=(name.model if name else ''), name_extra=(name.extra if name else ()))


# ---------------------------------------------------------------------------------------------
# writing


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary name, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (made contiguous) to a safetensors file atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def export_encoder(src: str | Path, dst: str | Path, trust: bool = False) -> Path:
    """Export the encoder (+ norm_stats, head, CLAP projections and text encoder) of any weight file to safetensors.

    The model name (geometry and sample rate) is stored in the metadata, so the file loads
    anywhere, whatever it is called.
    """
    ckpt = load_checkpoint(src, trust=trust)
    tensors = dict(ckpt.encoder)
    tensors['norm_stats'] = torch.tensor(ckpt.norm_stats, dtype=torch.float32)
    tensors.update({f'head.{k}': v for k, v in ckpt.head.items()})
    tensors.update(ckpt.clap)
    tensors.update({TEXT_ENCODER_PREFIX + k: v for k, v in ckpt.text_encoder.items()})
    model = ckpt.model_name or f'm2d_vit_{next((w for w, d in WIDTHS.items() if d[0] == ckpt.vit.embed_dim), "custom")}'
    name = ModelName(model, ckpt.vit.input_size, ckpt.vit.patch_size, ckpt.sample_rate, ckpt.name_extra).format()
    meta = {'m2d_name': name, 'source': Path(src).name, 'config': json.dumps(ckpt.vit.__dict__)}
    return save_safetensors(tensors, dst, metadata=meta)
