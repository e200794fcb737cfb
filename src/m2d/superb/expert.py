"""s3prl upstream experts.

`UpstreamExpert('CKPT,MEAN,STD')` follows the convention of the seed's SUPERB scripts: the LMS of the
task is normalized with the task's statistics (computed once with `CalcNormExpert`, upstream name
``m2d_calcnorm``), then every layer of the encoder is returned as ``hidden_states``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

log = logging.getLogger(__name__)

SUPERB_SAMPLE_RATE = 16000


def parse_ckpt_arg(ckpt: str) -> tuple[str, tuple[float, float] | None]:
    """'PATH' or 'PATH,MEAN,STD' (s3prl's -k) -> (path, stats or None)."""
    parts = str(ckpt).split(',')
    if len(parts) == 1:
        return parts[0], None
    if len(parts) != 3:
        raise ValueError(f'-k {ckpt!r}: expected PATH or PATH,MEAN,STD')
    try:
        return parts[0], (float(parts[1]), float(parts[2]))
    except ValueError:
        raise ValueError(f'-k {ckpt!r}: MEAN and STD must be numbers') from None


def _pad_batch(wavs: list[torch.Tensor]) -> torch.Tensor:
    return pad_sequence([w.reshape(-1) for w in wavs], batch_first=True)


class UpstreamExpert(nn.Module):
    """M2D as an s3prl upstream: `forward(wavs)` -> {'last_hidden_state', 'hidden_states'}."""

    def __init__(self, ckpt: str, model_config: str | None = None, **kwargs):
        super().__init__()
        from .. import load

        path, stats = parse_ckpt_arg(ckpt)
        self.runtime = load(path)
        if self.runtime.sample_rate != SUPERB_SAMPLE_RATE:
            raise ValueError(f'{path}: SUPERB feeds 16 kHz audio; this model expects {self.runtime.sample_rate} Hz')
        if stats is None:
            log.warning('no task statistics given (-k CKPT,MEAN,STD); using the checkpoint norm_stats %s',
                        self.runtime.norm_stats.tolist())
        else:
            self.runtime.norm_stats.copy_(torch.tensor(stats))
        self.runtime.flat_features = False

    def get_downsample_rates(self, key: str = '') -> int:
        """Input samples per output frame: hop (160) x patch width."""
        return self.runtime.to_spec.config.hop_length * self.runtime.cfg.patch_size[1]

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        lms = self.runtime.normalize_batch(self.runtime.to_feature(_pad_batch(wavs)))
        layers = self.runtime.encode_lms(lms, return_layers=True)
        return {'last_hidden_state': layers[-1], 'hidden_states': layers}


class CalcNormExpert(nn.Module):
    """Running mean/std of the task's LMS (upstream ``m2d_calcnorm``).

    After `max_updates` forward calls it logs the statistics, writes them to `stats_file` and stops
    the run (SystemExit), like the reference's calcnorm upstream.
    """

    def __init__(self, ckpt: str, model_config: str | None = None, max_updates: int = 10000,
                 stats_file: str = 'm2d_norm_stats.json', **kwargs):
        super().__init__()
        from .. import load

        path, _ = parse_ckpt_arg(ckpt)
        self.runtime = load(path)
        self.max_updates, self.stats_file = max_updates, Path(stats_file)
        self.n = 0
        self.total = self.total_sq = 0.0
        self.count = 0

    def get_downsample_rates(self, key: str = '') -> int:
        return self.runtime.to_spec.config.hop_length * self.runtime.cfg.patch_size[1]

    @property
    def stats(self) -> tuple[float, float]:
        mean = self.total / max(self.count, 1)
        var = max(self.total_sq / max(self.count, 1) - mean * mean, 0.0)
        return mean, var ** 0.5

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        for w in wavs:
            lms = self.runtime.to_feature(w.reshape(1, -1)).double()
            self.total += lms.sum().item()
            self.total_sq += lms.pow(2).sum().item()
            self.count += lms.numel()
        self.n += 1
        if self.n >= self.max_updates:
            mean, std = self.stats
            self.stats_file.write_text(json.dumps({'mean': mean, 'std': std}))
            log.warning('m2d_calcnorm: after %d updates mean=%s std=%s (saved to %s); use -k CKPT,%s,%s',
                        self.n, mean, std, self.stats_file, mean, std)
            raise SystemExit(0)
        lms = self.runtime.normalize_batch(self.runtime.to_feature(_pad_batch(wavs)))
        layers = self.runtime.encode_lms(lms, return_layers=True)
        return {'last_hidden_state': layers[-1], 'hidden_states': layers}
