"""The HEAR API (hear-eval-kit, hear-validator) over RuntimeM2D.

    >>> import m2d.hear as hear
    >>> model = hear.load_model()                                 # the default released model, by name
    >>> model = hear.load_model('checkpoint-300.pth', timestamp_hop_ms=40)
    >>> scene = hear.get_scene_embeddings(audio, model)          # [n_sounds, 3840]
    >>> emb, ts = hear.get_timestamp_embeddings(audio, model)    # [n, T', 3840], [n, T'] in ms

Timestamp embeddings come every patch width by default (160 ms for 16x16 patches). With
`timestamp_hop_ms` (e.g. 40) they are computed on a finer grid by encoding shifted copies of the
input and interleaving the outputs (see `fine_timestamp_embeddings`).
"""

from __future__ import annotations

import math
import os

import torch

from . import load
from .audio import num_frames
from .errors import M2DError
from .runtime import RuntimeM2D
from .streaming import STREAM_WINDOWS, encode_stream, waveform_blocks

DEFAULT_MODEL = 'm2d_vit_base-80x608p16x16-221006-mr7'  # the general-purpose release of the M2D paper
HOP_ENV = 'M2D_HEAR_HOP_MS'  # default timestamp_hop_ms for tools that cannot pass options (hear-validator)


class HearError(M2DError, ValueError):
    """A HEAR option that cannot be used with this model (e.g. a hop that is not whole frames)."""


def load_model(model_file_path: str = '', timestamp_hop_ms: float | None = None, **kwargs) -> RuntimeM2D:
    """A RuntimeM2D with the attributes HEAR expects (`sample_rate`, embedding sizes).

    model_file_path: a weight file or a released model name; empty: `DEFAULT_MODEL` (downloaded once
    into the cache, see `m2d.hub`). timestamp_hop_ms: spacing of the timestamp embeddings (default:
    ``$M2D_HEAR_HOP_MS`` if set, else the model's own, the patch width; finer values cost more, see
    `fine_timestamp_embeddings`).
    """
    if timestamp_hop_ms is None and os.environ.get(HOP_ENV):  # tools that call load_model(path) only
        timestamp_hop_ms = float(os.environ[HOP_ENV])
    model = load(model_file_path or DEFAULT_MODEL, **kwargs)
    model.scene_embedding_size = model.feature_d
    model.timestamp_embedding_size = model.feature_d
    native = 1000.0 / model.frame_rate
    if timestamp_hop_ms is not None:
        _shift_frames(model, timestamp_hop_ms)  # check it now, not at the first call
    model.timestamp_hop_ms = float(timestamp_hop_ms) if timestamp_hop_ms is not None else native
    return model


def get_scene_embeddings(audio: torch.Tensor, model: RuntimeM2D) -> torch.Tensor:
    """`audio` [n_sounds, n_samples] in [-1, 1] at `model.sample_rate` -> [n_sounds, feature_d]."""
    with torch.no_grad():
        return model.get_scene_embeddings(audio.to(model.norm_stats.device))


def get_timestamp_embeddings(audio: torch.Tensor, model: RuntimeM2D) -> tuple[torch.Tensor, torch.Tensor]:
    """`audio` [n_sounds, n_samples] -> (embeddings [n, T', feature_d], centre timestamps in ms [n, T']).

    Spaced `model.timestamp_hop_ms` apart (set by `load_model`; default the patch width).
    """
    audio = audio.to(model.norm_stats.device)
    hop = getattr(model, 'timestamp_hop_ms', None)
    with torch.no_grad():
        if hop is None or math.isclose(hop, 1000.0 / model.frame_rate):
            return model.get_timestamp_embeddings(audio)
        return fine_timestamp_embeddings(audio, model, hop)


def _shift_frames(model: RuntimeM2D, hop_ms: float) -> int:
    """The hop in log-mel frames; HearError unless it is a whole number of frames."""
    frame_ms = 1000.0 * model.to_spec.config.hop_length / model.sample_rate
    d = hop_ms / frame_ms
    if not (hop_ms > 0 and math.isclose(d, round(d), abs_tol=1e-6) and round(d) >= 1):
        raise HearError(f'timestamp_hop_ms={hop_ms}: must be a positive multiple of the {frame_ms:g} ms '
                        'log-mel frame (e.g. 40 or 50)')
    return int(round(d))


def fine_timestamp_embeddings(audio: torch.Tensor, model: RuntimeM2D,
                              hop_ms: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestamp embeddings every `hop_ms` ms, computed, not interpolated.

    Output n is the encoder's feature of the patch column that starts at log-mel frame ``n * d``
    (``d = hop_ms / 10``) when the input starts at frame ``o = (n * d) mod pw`` (pw: patch width in
    frames): the input is encoded once per distinct shift o, each time dropping its first o frames,
    and the per-shift outputs are interleaved. With d = pw this is the plain `encode`. Every output
    thus sees a real patch-aligned window with the context the model was trained on.

    Cost: one full encoder pass per distinct shift, ``pw / gcd(d, pw)`` passes: with 16-frame
    (160 ms) patches, 4x the plain cost for 40 ms, 2x for 80 ms, 16x for 50 ms (5 frames is prime
    to 16), 8x for 20 ms; memory is that of the output plus a bounded batch of windows (the input is
    encoded `STREAM_WINDOWS` windows at a time, so hours of audio fit). Hops coarser than the patch
    width need one pass and subsample. Timestamps are the window centres ``(n * d + pw / 2) * 10`` ms.

    Returns (embeddings ``[B, N, feature_d]``, timestamps ``[B, N]`` in ms) with ``N = ceil(T / d)``
    for a log-mel of T frames.
    """
    if model.flat_features:
        raise HearError('timestamps need stacked features; create the runtime with flat_features=False')
    d = _shift_frames(model, hop_ms)
    pw, unit = model.cfg.patch_size[1], model.cfg.input_size[1]
    if unit % pw:  # e.g. 1001-frame units: chunk boundaries break the uniform patch grid
        raise HearError(f'timestamp_hop_ms: the {unit}-frame input of {model.weight_file} is not a multiple of '
                        f'its {pw}-frame patches; use the default hop')
    hop = model.to_spec.config.hop_length
    frame_ms = 1000.0 * hop / model.sample_rate
    n_out = math.ceil(num_frames(audio.shape[-1], hop) / d)
    starts = torch.arange(n_out) * d
    block = STREAM_WINDOWS * unit * hop
    out = None
    for o in sorted({int(s) % pw for s in starts}):
        pick = torch.nonzero(starts % pw == o).reshape(-1)
        src = (starts[pick] - o) // pw  # window of the shifted input (starting at frame o) each output takes
        t0 = 0
        # the shifted log-mel encoded a bounded batch of windows at a time (`m2d.streaming`)
        for (feats,) in encode_stream(model, waveform_blocks(audio, block), skip_frames=o):
            if out is None:
                out = feats.new_empty(feats.shape[0], n_out, feats.shape[-1])
            sel = (src >= t0) & (src < t0 + feats.shape[1])
            out[:, pick[sel]] = feats[:, src[sel] - t0]
            t0 += feats.shape[1]
    ts = (starts.to(torch.float32) + pw / 2) * frame_ms
    return out, ts.to(out.device).expand(out.shape[0], -1)
