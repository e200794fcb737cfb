"""s3prl upstream experts.

`UpstreamExpert('CKPT,MEAN,STD')` follows the convention of the seed's SUPERB scripts: the waveforms of
a batch are zero-padded to the longest, their log-mel is normalized with the task's statistics (from
`m2d superb stats`, or the ``m2d_calcnorm`` upstream of the old procedure), and every layer of the
encoder is returned as ``hidden_states``. Each kind of suspicious input is reported once, in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..audio import LOG_EPS
from ..fileio import atomic_path
from . import SuperbError
from .stats import Moments, padded_lms
from .tasks import check_stats

log = logging.getLogger(__name__)

SUPERB_SAMPLE_RATE = 16000
BAND_CHECK_BATCHES = 8  # batches inspected for audio without energy above 4 kHz
EMPTY_BAND_DB = -40.0  # upper band this far below the lower band: band-limited (8 kHz) audio


def parse_ckpt_arg(ckpt: str) -> tuple[str, tuple[float, float] | None]:
    """s3prl's -k: 'CKPT' or 'CKPT,MEAN,STD' -> (CKPT, (mean, std) or None); SuperbError in one line."""
    usage = 'expected -k CKPT or -k CKPT,MEAN,STD (e.g. -k /w/checkpoint-1000.pth,-11.506255,4.314857)'
    if ckpt is None or not str(ckpt).strip():
        raise SuperbError(f'-k: no M2D weight file given; {usage}')
    parts = [p.strip() for p in str(ckpt).split(',')]
    if len(parts) == 1:
        return parts[0], None
    if len(parts) != 3 or not parts[0]:
        raise SuperbError(f'-k {ckpt!r}: {usage}; got {len(parts)} comma-separated parts '
                          '(a weight file path may not contain commas)')
    return parts[0], check_stats(parts[1], parts[2], f'-k {ckpt!r} (CKPT,MEAN,STD)')


def _load_16k(path: str):
    from .. import load

    runtime = load(path)
    if runtime.sample_rate != SUPERB_SAMPLE_RATE:
        raise SuperbError(f'{path}: SUPERB feeds 16 kHz audio; this model expects {runtime.sample_rate} Hz '
                          '(use a 16 kHz M2D weight file)')
    runtime.flat_features = False
    return runtime


class _Checks:
    """One-time messages about the batches s3prl feeds (each said once per expert)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.said: set[str] = set()
        self.batches = 0
        cfg = runtime.to_spec.config
        fb = runtime.to_spec.mel_fb.cpu()  # [n_mels, n_freq]
        low_hz = (fb > 0).float().argmax(dim=1).float() * cfg.sample_rate / cfg.n_fft  # lowest frequency of each bin
        self.upper = low_hz > 4300.0  # mel bins entirely above what 8 kHz audio can hold

    def once(self, key: str, level: int, msg: str, *args) -> None:
        if key not in self.said:
            self.said.add(key)
            log.log(level, msg, *args)

    def __call__(self, wavs: list[torch.Tensor], lms: torch.Tensor) -> None:
        lengths = [int(w.numel()) for w in wavs]
        if min(lengths) != max(lengths):
            self.once('lengths', logging.INFO,
                      'm2d upstream: a batch holds waveforms of %d to %d samples; they are zero-padded to the '
                      'longest as in the reference, and the task statistics include that padding '
                      '(`m2d superb stats` computes them that way)', min(lengths), max(lengths))
        if self.batches < BAND_CHECK_BATCHES and 'band' not in self.said:
            self.batches += 1
            power = (lms.detach().double().exp() - LOG_EPS).clamp(min=0).mean(dim=(0, 1, 3))  # [n_mels]
            upper, lower = power[self.upper].mean(), power[~self.upper].mean()
            if lower > 1e-6 and 10 * torch.log10(upper / lower + 1e-30) < EMPTY_BAND_DB:
                self.once('band', logging.WARNING,
                          'm2d upstream: the input holds no energy above 4 kHz (%.0f dB below the lower band): '
                          '8 kHz audio? SUPERB expects 16 kHz recordings; results will not compare with '
                          'published ones', float(10 * torch.log10(upper / lower + 1e-30)))


class UpstreamExpert(nn.Module):
    """M2D as an s3prl upstream: `forward(wavs)` -> {'last_hidden_state', 'hidden_states'}."""

    def __init__(self, ckpt: str, model_config: str | None = None, **kwargs):
        super().__init__()
        path, stats = parse_ckpt_arg(ckpt)
        self.runtime = _load_16k(path)
        own = [round(float(v), 6) for v in self.runtime.norm_stats.tolist()]
        if stats is None:
            log.warning('m2d upstream: no task statistics given (-k CKPT,MEAN,STD); normalizing with the '
                        "checkpoint's own norm_stats mean=%s std=%s (compute the task's: m2d superb stats)", *own)
        else:
            self.runtime.norm_stats.copy_(torch.tensor(stats))
            log.info('m2d upstream: normalizing with the task statistics from -k: mean=%s std=%s '
                     "(not the checkpoint's own %s, %s)", stats[0], stats[1], *own)
        self.checks = _Checks(self.runtime)

    def get_downsample_rates(self, key: str = '') -> int:
        """Input samples per output frame: hop (160) x patch width."""
        return self.runtime.to_spec.config.hop_length * self.runtime.cfg.patch_size[1]

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        lms = padded_lms(wavs, self.runtime.to_feature)
        self.checks(wavs, lms)
        layers = self.runtime.encode_lms(self.runtime.normalize_batch(lms), return_layers=True)
        return {'last_hidden_state': layers[-1], 'hidden_states': layers}


class CalcNormExpert(nn.Module):
    """Statistics of the task's log-mel, measured on the batches s3prl feeds (upstream ``m2d_calcnorm``).

    The statistic is the same as `m2d superb stats`: every value of the log-mel of each zero-padded
    batch, pooled in float64 (see `m2d.superb.stats`). After `max_updates` forward calls it logs the
    statistics, writes them to `stats_file` (JSON) and stops the run (SystemExit), like the
    reference's calcnorm upstream. `m2d superb stats` gives the same numbers without starting s3prl.
    """

    def __init__(self, ckpt: str, model_config: str | None = None, max_updates: int = 10000,
                 stats_file: str = 'm2d_norm_stats.json', **kwargs):
        super().__init__()
        path, _ = parse_ckpt_arg(ckpt)
        self.runtime = _load_16k(path)
        self.max_updates, self.stats_file = max_updates, Path(stats_file)
        self.n = 0
        self.moments = Moments()
        self.checks = _Checks(self.runtime)

    def get_downsample_rates(self, key: str = '') -> int:
        return self.runtime.to_spec.config.hop_length * self.runtime.cfg.patch_size[1]

    @property
    def stats(self) -> tuple[float, float]:
        """(mean, std) of the values seen so far."""
        return self.moments.mean, self.moments.std

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        lms = padded_lms(wavs, self.runtime.to_feature)
        self.checks(wavs, lms)
        self.moments.merge(Moments.of(lms))
        self.n += 1
        if self.n >= self.max_updates:
            mean, std = self.stats
            with atomic_path(self.stats_file) as tmp:
                tmp.write_text(json.dumps({'mean': mean, 'std': std, 'batches': self.n,
                                           'values': self.moments.count}) + '\n')
            log.warning('m2d_calcnorm: after %d batches mean=%s std=%s (saved to %s); use -k CKPT,%s,%s',
                        self.n, mean, std, self.stats_file, mean, std)
            raise SystemExit(0)
        layers = self.runtime.encode_lms(self.runtime.normalize_batch(lms), return_layers=True)
        return {'last_hidden_state': layers[-1], 'hidden_states': layers}
