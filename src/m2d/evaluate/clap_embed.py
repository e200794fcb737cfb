"""What zero-shot classification and retrieval share: loading an M2D-CLAP weight file, CLAP audio
embeddings of many clips (on the jobs engine, cached) and text embeddings, and cosine similarity.

A CLAP runtime is what `m2d.load` returns for an M2D-CLAP weight file: ``encode_audio(wav [B,
samples]) -> [B, D]`` (``audio_proj`` of the mean over all patch features of the whole waveform) and
``encode_text(list[str]) -> [N, D]``. Similarities are cosines of the two, as EVAR computes them
(``BaseCLAP.compute_similarity``: both sides L2-normalized, then a dot product); `logit_scale` and
softmax/sigmoid change no ranking, so accuracy, mAP and recall@K are computed on the cosines.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import M2DError
from .embed import Embeddings, _load, _save, file_sha256, run_clips
from .tasks import Clip, load_clip

log = logging.getLogger(__name__)


class ClapEvalError(M2DError):
    """A weight file or input that zero-shot evaluation cannot use; the message names it."""


@dataclass
class LoadedCLAP:
    """An M2D-CLAP weight file ready to encode audio and text."""

    path: Path
    runtime: Any     # m2d.runtime.RuntimeM2D with the CLAP text side
    sha256: str
    name: str


@dataclass
class EncodingOptions:
    """How a CLAP evaluation encodes clips and captions (the options `m2d zeroshot` and `m2d retrieval`
    share); `checked` builds one from keyword arguments and rejects unknown or out-of-range values."""

    batch_size: int = 16                 # clips encoded together
    text_batch_size: int = 64            # captions encoded together
    text_encoder: str | None = None      # overrides the text encoder the weight file's name implies
    device: str | None = None
    bf16: bool = False
    cache_dir: str | None = None
    use_cache: bool = True
    max_failed: float = 0.01
    progress: bool = True
    trust: bool = False

    @classmethod
    def checked(cls, options: dict[str, Any], command: str):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise M2DError(f'{command}: unknown option(s) {", ".join(unknown)} (known: {", ".join(sorted(names))})')
        opts = cls(**options)
        for name in ('batch_size', 'text_batch_size'):
            if getattr(opts, name) < 1:
                raise M2DError(f'--{name} {getattr(opts, name)}: must be at least 1')
        if not 0 <= opts.max_failed <= 1:
            raise M2DError(f'--max_failed {opts.max_failed}: expected a fraction between 0 and 1')
        return opts


def load_clap(weights: str | Path, *, bf16: bool = False, trust: bool = False,
              text_encoder: str | None = None) -> LoadedCLAP:
    """Resolve (released names too) and load an M2D-CLAP weight file with `m2d.load`; `text_encoder`
    (a Hugging Face name or a local folder) replaces the text encoder the file's name implies."""
    from .. import hub, load
    from .linear import weights_name

    path = hub.weights_path(weights)
    kwargs: dict[str, Any] = {'bf16': bf16, 'trust': trust}
    if text_encoder:
        kwargs['text_encoder'] = text_encoder
    runtime = load(path, **kwargs)
    if not runtime.is_clap:
        raise ClapEvalError(f'{path}: no audio_proj; zero-shot evaluation needs an M2D-CLAP weight file '
                            '(e.g. m2d_clap_vit_base-80x608p16x16-240128)')
    return LoadedCLAP(path, runtime, file_sha256(path), weights_name(path))


def read_waveform(path: Path, sample_rate: int, unit_samples: int | None) -> np.ndarray:
    """A clip at `sample_rate`: cropped from the start / zero-padded to `unit_samples`, or whole (None)."""
    if unit_samples is not None:
        return load_clip(path, sample_rate, unit_samples)
    from ..audio import load_audio

    return np.ascontiguousarray(load_audio(path, sample_rate), dtype=np.float32)


def cache_path(root: Path, name: str, identity: dict[str, Any], clips: Sequence[Clip]) -> Path:
    """The cache file of CLAP audio embeddings of `clips` (their keys and files) under `identity`."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for c in clips:
        h.update(f'{c.key}\t{c.path}\n'.encode())
    safe = ''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in name)
    return root / f'{safe}-clap-audio-{h.hexdigest()[:20]}.npz'


def audio_embeddings(loaded: LoadedCLAP, clips: Sequence[Clip], *, name: str, unit_sec: float | None,
                     batch_size: int = 16, device: str | torch.device = 'cpu', cache_dir: str | Path | None = None,
                     use_cache: bool = True, progress: bool = True) -> Embeddings:
    """CLAP audio embeddings ``x [N, 1, D]`` of `clips` (each cropped/padded to `unit_sec`, or whole when
    None; clips of equal length are encoded together), cached per weight file, clips and settings."""
    from .embed import cache_root

    runtime = loaded.runtime
    sr = int(runtime.sample_rate)
    unit = None if unit_sec is None else int(round(unit_sec * sr))
    identity = {'weights_sha256': loaded.sha256, 'kind': 'clap-audio', 'sample_rate': sr, 'unit_sec': unit_sec,
                'bf16': bool(getattr(runtime, 'bf16', False)),
                'norm_stats': [round(float(v), 6) for v in runtime.norm_stats.tolist()]}
    path = cache_path(cache_root(cache_dir), name, identity, clips)
    if use_cache and path.is_file():
        emb = _load(path)
        if emb is not None:
            return emb
    runtime = runtime.to(device).eval()

    def encode(batch: list[np.ndarray]) -> list[np.ndarray]:
        wav = torch.from_numpy(np.stack(batch)).to(device)
        with torch.inference_mode():
            emb = runtime.encode_audio(wav).float()
        return list(emb.cpu().numpy()[:, None])

    results, failed, seconds = run_clips(None, clips, f'clap-audio-{name}',
                                         lambda c: read_waveform(c.path, sr, unit), encode, batch_size, progress)
    keys = [c.key for c in clips if c.key in results]
    if not keys:
        first = failed[0] if failed else ('?', 'no result')
        raise ClapEvalError(f'{name}: no clip could be encoded ({len(failed)} failed; first: {first[0]}: {first[1]})')
    if len(keys) < len(clips) and not failed:
        failed = [(str(c.path), 'no result') for c in clips if c.key not in results]
    emb = Embeddings(name='clap-audio', keys=keys, x=np.stack([results[k] for k in keys]).astype(np.float32),
                     layers=[], failed=failed, seconds=seconds)
    log.info('%s: CLAP audio embeddings %s of %d clips in %.1f s%s', name, emb.x.shape[1:], len(keys), seconds,
             f', {len(failed)} failed' if failed else '')
    if use_cache:
        _save(path, emb, identity)
    return emb


def text_embeddings(runtime: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """CLAP text embeddings ``[N, D]`` (float32) of `texts`, `batch_size` texts per text encoder pass."""
    if not texts:
        raise ClapEvalError('no text to encode')
    with torch.inference_mode():
        return runtime.encode_text(list(texts), batch_size=batch_size).float().cpu().numpy()


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` cosines of the rows of `a` and `b` (EVAR's compute_similarity)."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def check_failed(name: str, failed: list[tuple[str, str]], total: int, max_failed: float) -> None:
    """Error when more than `max_failed` of `total` clips could not be read; warn about fewer."""
    if not failed:
        return
    n = len(failed)
    if n > max_failed * total:
        raise ClapEvalError(f'{name}: {n} of {total} clips could not be read ({100 * n / total:.1f} %, more than the '
                        f'{100 * max_failed:g} % that may be skipped); first: {failed[0][0]}: {failed[0][1]}')
    log.warning('%s: %d of %d clips could not be read and are left out of the scores; first: %s', name, n, total,
                failed[0][1])
