"""SUPERB (s3prl) upstream for M2D: the expert, its hub entries and an installer."""

from .expert import CalcNormExpert, UpstreamExpert, parse_ckpt_arg

__all__ = ['UpstreamExpert', 'CalcNormExpert', 'parse_ckpt_arg']
