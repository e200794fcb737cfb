"""`m2d demo`: the whole method on a small task, end to end on a CPU in minutes.

A labeled collection of synthesized sounds (`synth`) is converted to log-mel files, a tiny M2D is
pre-trained from scratch on the train split's audio, and the checkpoint is evaluated by linear
probing against a random encoder of the same shape and raw log-mel features (`pipeline`); the
report (`report`, `figures`) shows the results, the training curves and the masking.
"""

from __future__ import annotations

from .pipeline import DemoConfig, DemoError, DemoResult, run_demo

__all__ = ['DemoConfig', 'DemoError', 'DemoResult', 'run_demo']
