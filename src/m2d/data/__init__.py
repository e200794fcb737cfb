"""Data preparation and training datasets: audio -> log-mel .npy conversion (`convert`), file
lists (`filelist`), normalization statistics (`stats`), LMS datasets with cropping, normalization
and noise mixing (`datasets`), the FSDD download helper (`fsdd`), and EVAR's downstream tasks
prepared from their published sources (the `tasks` package, `m2d datasets TASK DEST`).

Names are imported lazily, so worker processes load only what they use. `m2d.data.convert` is the
module; the function is `m2d.data.convert.convert`.
"""

from __future__ import annotations

import importlib

_NAMES = {
    'ConvertSummary': 'convert', 'wav_to_lms': 'convert', 'prepare_fsdd': 'fsdd',
    'LMSDataset': 'datasets', 'NoiseMixDataset': 'datasets', 'compute_norm_stats': 'datasets',
    'inflate_files': 'datasets', 'log_mix_exp': 'datasets',
    'DataError': 'filelist', 'MissingDataError': 'filelist', 'guess_data_root': 'filelist',
    'list_npy_files': 'filelist', 'read_file_list': 'filelist', 'resolve_list': 'filelist',
    'write_filelist': 'filelist', 'PathTable': 'pathtable', 'NpyReader': 'npyread',
    'RunningStats': 'stats', 'lms_stats': 'stats',
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f'.{_NAMES[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
