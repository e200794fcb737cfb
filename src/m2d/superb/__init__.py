"""SUPERB (s3prl) for M2D: the upstream experts, their installer, task statistics, task runs and reports."""

from ..errors import M2DError


class SuperbError(M2DError, ValueError):
    """A SUPERB user error (a wrong -k string, task, s3prl folder or result folder), in one line."""


from .expert import CalcNormExpert, UpstreamExpert, parse_ckpt_arg  # noqa: E402

__all__ = ['SuperbError', 'UpstreamExpert', 'CalcNormExpert', 'parse_ckpt_arg']
