"""Normalization statistics given as text: the one parser of every ``MEAN,STD`` option.

``--norm_stats`` of pre-training, speech pre-training, linear evaluation and fine-tuning, and the
statistics of the SUPERB commands all read a log-mel mean and standard deviation the same way:

    >>> parse_mean_std('-7.1,4.2')
    (-7.1, 4.2)

Accepted: ``MEAN,STD``, ``MEAN STD``, the reference's ``[MEAN, STD]``, or a pair of numbers. Both
must be finite and STD positive; otherwise one error naming the option (`what`) and the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import M2DError


def parse_mean_std(value: str | Sequence[float], what: str = '--norm_stats', error: type[Exception] = M2DError,
                   expected: str = 'MEAN,STD') -> tuple[float, float]:
    """(mean, std) from ``'MEAN,STD'`` (or ``'MEAN STD'``, ``'[MEAN, STD]'``, a pair); `error` naming
    `what` and the value otherwise. `expected` words the accepted forms in that message."""
    if isinstance(value, str):
        parts: Sequence = [p for p in re.split(r'[\s,]+', value.strip().strip('[]()').strip()) if p]
    else:
        parts = list(value) if isinstance(value, Sequence) else []
    try:
        mean, std = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise error(f'{what} {value!r}: expected {expected} (e.g. -7.1,4.2)') from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise error(f'{what} {value!r}: expected {expected} with a finite MEAN and STD > 0 (e.g. -7.1,4.2)')
    return mean, std
