"""benchmarks/summarize.py: the medians of repeated benchmark runs that the before/after tables report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'summarize.py'


@pytest.fixture(scope='module')
def summarize():
    spec = importlib.util.spec_from_file_location('bench_summarize', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.summarize


def _pretrain(bf16: float, fp32: float = 1.0) -> dict:
    return {'results': {'fp32': {'samples_per_s': fp32, 'percent_of_peak': 60.0},
                        'bf16': {'samples_per_s': bf16, 'percent_of_peak': 20.0 * bf16}},
            'bf16_vs_fp32': {'step_speedup': bf16 / fp32, 'speedup_over_peak_ratio': bf16 / fp32 / 6.0}}


def _encode(bf16: float) -> dict:
    return {'results': [{'precision': 'float32', 'clips_per_s': 3.0, 'pct_of_peak': 75.0},
                        {'precision': 'bfloat16', 'clips_per_s': bf16, 'pct_of_peak': 4.0 * bf16}],
            'bf16_vs_fp32': {'speedup': bf16 / 3.0, 'speedup_over_peak_ratio': 0.5}}


def test_medians_per_benchmark_threads_and_label(tmp_path, summarize):
    for k, v in enumerate([4.0, 5.0, 4.4], 1):
        (tmp_path / f'pretrain_after_t1_r{k}.json').write_text(json.dumps(_pretrain(v)))
    for k, v in enumerate([4.3, 4.1], 1):
        (tmp_path / f'pretrain_before_t1_r{k}.json').write_text(json.dumps(_pretrain(v)))
    (tmp_path / 'encode_after_t2_r1.json').write_text(json.dumps(_encode(12.0)))
    (tmp_path / 'notes.json').write_text('{}')  # other files are ignored
    lines = summarize(tmp_path).splitlines()
    assert len(lines) == 2 + 3
    encode, before, after = lines[2:]  # encode first; before ahead of after
    assert '| pretrain | 1 | before | 2 | 1.00 (60.0 %) | 4.20 (84.0 %) | 4.10-4.30 | 4.20x | 70 % |' == before
    assert '| pretrain | 1 | after | 3 | 1.00 (60.0 %) | 4.40 (88.0 %) | 4.00-5.00 | 4.40x | 73 % |' == after
    assert encode.startswith('| encode | 2 | after | 1 | 3.00 (75.0 %) | 12.00 (48.0 %) | 12.00-12.00 | 4.00x | 50 % |')


def test_a_folder_without_runs_is_an_error(tmp_path, summarize):
    with pytest.raises(SystemExit, match='no BENCH_LABEL'):
        summarize(tmp_path)
