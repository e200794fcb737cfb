"""Where the time of a benchmark goes: a ``torch.profiler`` run summed into a few categories.

Used by ``pretrain.py --profile`` and ``encode.py --profile``. Each operator's self CPU time is put
in one category by its name, except that everything under the optimizer's step, the EMA's
``_foreach_lerp_`` and the gradient clipping's ``_foreach_norm``/``_foreach_mul_`` counts for
that phase. On CPU, self CPU time is the time the operator's own kernel took; on CUDA the table is of the
host side only (launches), so it says where the CPU waits, not where the GPU works.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable

from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)


def _phase_of(name: str) -> str | None:
    if name.startswith('Optimizer.step') or name.startswith('aten::_fused_adam'):
        return 'optimizer (AdamW)'
    if name in ('aten::_foreach_lerp_', 'aten::lerp_'):
        return 'EMA target update'
    if name in ('aten::_foreach_norm', 'aten::_foreach_mul_'):
        return 'gradient norm/clip'
    return None

# (category, operator names); checked in order, first match wins
CATEGORIES = [
    ('matmul (linear layers)', ('aten::mm', 'aten::addmm', 'aten::matmul', 'aten::linear', 'aten::addmv',
                                'aten::_addmm_activation',
                                'mkldnn::_linear_pointwise')),  # packed weights; includes the fused GELU
    ('attention (bmm, softmax, fused kernels)', ('aten::bmm', 'aten::baddbmm', 'aten::_softmax',
                                                 'aten::_softmax_backward_data', 'aten::softmax',
                                                 'aten::_scaled_dot_product_flash_attention_for_cpu',
                                                 'aten::_scaled_dot_product_flash_attention_for_cpu_backward',
                                                 'aten::_scaled_dot_product_attention_math',
                                                 'aten::_scaled_dot_product_flash_attention',
                                                 'aten::_scaled_dot_product_efficient_attention',
                                                 'aten::_scaled_dot_product_cudnn_attention',
                                                 'aten::_efficient_attention_backward',
                                                 'aten::_flash_attention_backward')),
    ('patch embedding (conv)', ('aten::mkldnn_convolution', 'aten::convolution_backward', 'aten::_convolution',
                                'aten::convolution', 'aten::cudnn_convolution')),
    ('LayerNorm', ('aten::native_layer_norm', 'aten::native_layer_norm_backward')),
    ('GELU', ('aten::gelu', 'aten::gelu_backward')),
    ('casts and copies', ('aten::copy_', 'aten::_to_copy', 'aten::to', 'aten::clone', 'aten::contiguous',
                          'aten::_foreach_copy_')),
    ('gather/scatter/cat (masking)', ('aten::gather', 'aten::scatter', 'aten::scatter_', 'aten::scatter_add_',
                                      'aten::cat', 'aten::index', 'aten::index_select', 'aten::argsort',
                                      'aten::sort')),
    ('elementwise (add, mul, loss)', ('aten::add', 'aten::add_', 'aten::mul', 'aten::mul_', 'aten::sub',
                                      'aten::div', 'aten::sum', 'aten::mean', 'aten::var', 'aten::sqrt',
                                      'aten::pow', 'aten::fill_', 'aten::zero_', 'aten::where', 'aten::neg',
                                      'aten::clamp_min', 'aten::norm', 'aten::linalg_vector_norm',
                                      'aten::rsub', 'aten::expand', 'aten::sub_', 'aten::div_')),
]


def _category(name: str) -> str:
    for cat, names in CATEGORIES:
        if name in names:
            return cat
    return 'other (allocation, views, Python, autograd)'


def _phase(event) -> str | None:
    e = event
    while e is not None:
        phase = _phase_of(e.name)
        if phase:
            return phase
        e = e.cpu_parent
    return None


def profile_table(run: Callable[[], None], calls: int, title: str) -> tuple[str, dict]:
    """Profile `run()` (doing `calls` units of work) and return (markdown table, {category: ms per call}).

    Rows are operator self times per call (the wall time of each operator on the thread that ran
    it, children excluded; intra-op threads are inside it), so the total is close to the wall
    time of a call; the last column is the share of that total.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run()
        wall_ms = 1000 * (time.perf_counter() - t0) / calls
    totals: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        key = _phase(ev) or _category(ev.name)
        totals[key] += ev.self_cpu_time_total / 1000.0 / calls  # us -> ms per call
    whole = sum(totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    lines = [f'{title}: {wall_ms:.0f} ms wall per call under the profiler', '',
             '| where | ms per call (self time) | share |', '|---|---:|---:|']
    lines += [f'| {k} | {v:.1f} | {100 * v / whole:.1f} % |' for k, v in rows]
    lines.append(f'| total | {whole:.1f} | 100 % |')
    return '\n'.join(lines), dict(rows)
