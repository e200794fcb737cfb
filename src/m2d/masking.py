"""Patch masks for masked pre-training, drawn for a whole batch at once.

A mask is held as a permutation of the patch indices per sample: ``ids_shuffle[b]`` lists the
visible patches first (``len_keep`` of them), then the masked ones; ``ids_restore`` is its
inverse, so patch ``i`` (original, frequency-major order) is visible when
``ids_restore[b, i] < len_keep``. Every sample of a batch masks the same number of patches.

Kinds (see METHOD.md, "Masking"):

- ``unstructured``: uniform random patches (MAE's argsort of uniform noise).
- ``structured``: random whole frequency rows plus random whole time columns.
- ``time_continuous``: spans of ``span`` time columns, all frequency rows of a column masked.

Fine-tuning's ``--training_mask`` draws the rows and columns of ``structured`` but keeps them, as the
reference's runtime does (`structured_training_mask`, `keep_selected`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_TYPES = ('unstructured', 'structured', 'time_continuous')


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of permutations ``[B, L]`` (a scatter, cheaper than a second argsort)."""
    ar = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, ar)


@dataclass(frozen=True)
class Mask:
    """A batch mask: ``ids_restore`` ``[B, L]`` (int64) and the number of visible patches ``len_keep``."""

    ids_restore: torch.Tensor
    len_keep: int

    @property
    def ids_shuffle(self) -> torch.Tensor:
        """Inverse permutation of ``ids_restore``: visible patch indices first, then masked ones."""
        return _inverse(self.ids_restore)

    @property
    def ids_keep(self) -> torch.Tensor:
        """Indices of the visible patches ``[B, len_keep]``."""
        return self.ids_shuffle[:, :self.len_keep]

    @property
    def ids_masked(self) -> torch.Tensor:
        """Indices of the masked patches ``[B, L - len_keep]``, in the order the predictions use."""
        return self.ids_shuffle[:, self.len_keep:]

    @property
    def num_patches(self) -> int:
        return self.ids_restore.shape[1]

    @property
    def num_masked(self) -> int:
        return self.num_patches - self.len_keep

    def binary(self) -> torch.Tensor:
        """Float mask ``[B, L]`` in original order: 1 for masked patches, 0 for visible ones."""
        return (self.ids_restore >= self.len_keep).float()

    def to(self, device: torch.device | str) -> 'Mask':
        return Mask(self.ids_restore.to(device), self.len_keep)


def as_mask(mask: 'Mask | tuple[torch.Tensor, int]') -> Mask:
    """Accept a `Mask` or an ``(ids_restore, len_keep)`` pair (len_keep an int or 0-d tensor)."""
    if isinstance(mask, Mask):
        return mask
    if not isinstance(mask, (tuple, list)) or len(mask) != 2:
        raise TypeError(f'mask must be a Mask or (ids_restore, len_keep), got {type(mask).__name__}')
    ids_restore, len_keep = mask
    ids_restore = torch.as_tensor(ids_restore).long()
    if ids_restore.dim() != 2:
        raise ValueError(f'mask ids_restore must be [B, L], got shape {tuple(ids_restore.shape)}')
    len_keep = int(len_keep)
    if not 0 <= len_keep <= ids_restore.shape[1]:
        raise ValueError(f'mask len_keep={len_keep} is outside [0, {ids_restore.shape[1]}]')
    return Mask(ids_restore, len_keep)


def mask_from_binary(masked: torch.Tensor) -> Mask:
    """A `Mask` from a boolean ``[B, L]`` (True = masked) with equal counts per row.

    Visible patches come first in ascending index order, then masked ones in ascending order.
    """
    masked = masked.bool()
    counts = masked.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f'every sample must mask the same number of patches, got counts {counts.tolist()}')
    ids_shuffle = torch.argsort(masked.to(torch.uint8), dim=1, stable=True)
    return Mask(_inverse(ids_shuffle), masked.shape[1] - (int(counts[0]) if counts.numel() else 0))


def _rand(shape: tuple[int, ...], device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform noise drawn on the generator's device (for reproducibility), then moved to `device`."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _check_ratio(mask_ratio: float) -> float:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
    return float(mask_ratio)


def random_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> Mask:
    """Unstructured mask: ``ids_shuffle = argsort(U(0,1))``, ``len_keep = int(L * (1 - ratio))``."""
    mask_ratio = _check_ratio(mask_ratio)
    noise = _rand((batch, num_patches), device, generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    return Mask(_inverse(ids_shuffle), int(num_patches * (1 - mask_ratio)))


def _pick(noise: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean ``[B, N]`` with exactly `n` True per row at the positions of the `n` smallest noise values."""
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return ranks < n


def structured_mask(batch: int, grid_size: tuple[int, int], mask_ratio: float,
                    device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Mask:
    """Random whole frequency rows and time columns of the ``Fp x Tp`` patch grid.

    Per batch: ``NF = min(F-1, int(F (r + 1/F) u))`` with one ``u ~ U(0,1)``,
    ``NT = int(T max(r + 0.5/T - NF/F, 0))``; each sample then masks NF random rows and NT
    random columns (their union; the count is the same for every sample).
    """
    masked = structured_selection(batch, grid_size, mask_ratio, device, generator)
    return _shuffled_from_binary(masked, generator)


def structured_selection(batch: int, grid_size: tuple[int, int], mask_ratio: float,
                         device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The rows and columns a structured mask selects: boolean ``[B, Fp*Tp]``, True on the NF random
    rows and NT random columns of each sample (NF, NT as in `structured_mask`)."""
    r = _check_ratio(mask_ratio)
    F, T = grid_size
    u = float(_rand((1,), 'cpu', generator))  # one draw per batch
    nf = min(F - 1, int(F * (r + 1.0 / F) * u))
    nt = int(T * max(r + 0.5 / T - nf / F, 0.0))
    nt = min(nt, T)
    rows = _pick(_rand((batch, F), device, generator), nf)
    cols = _pick(_rand((batch, T), device, generator), nt)
    return (rows[:, :, None] | cols[:, None, :]).reshape(batch, F * T)


def keep_selected(selected: torch.Tensor) -> Mask:
    """The fine-tuning mask of the reference's runtime from a selection ``[B, L]`` (True = selected).

    The reference (``random_structured_mask`` in nttcslab/m2d ``patch_m2d.diff``, used when EVAR
    fine-tunes with ``training_mask > 0``) orders the patches by ``argsort(mask, descending=True)`` and
    keeps the first "number of unselected" of them: the *selected* patches are kept, cut to that
    count, or topped up with unselected ones, in index order among ties. That order is the one of a
    stable sort, which is what CUDA's sort is for more than 32 entries (a 5 x 31 grid has 155); its
    CPU sort orders ties otherwise. Returns a `Mask` whose ``ids_keep`` are those patches, in that order.
    """
    # `mask_from_binary` of the unselected patches orders the selected ones first, both in index order;
    # of that order, keep as many patches as are unselected.
    order = mask_from_binary(~selected.bool())
    return Mask(order.ids_restore, order.num_masked)


def structured_training_mask(batch: int, grid_size: tuple[int, int], mask_ratio: float,
                             device: torch.device | str | None = None,
                             generator: torch.Generator | None = None) -> Mask:
    """The structured mask of fine-tuning (``--training_mask``): the rows and columns of
    `structured_selection`, kept as the reference's runtime keeps them (`keep_selected`)."""
    return keep_selected(structured_selection(batch, grid_size, mask_ratio, device, generator))


def time_continuous_mask(batch: int, grid_size: tuple[int, int], mask_ratio: float, span: int,
                         device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Mask:
    """Spans of `span` consecutive time columns, every frequency row of a masked column masked.

    Per sample, ``M = int(T r)`` columns: spans start at uniform random columns ``0..T-1`` (a span
    starting near the right edge is cut there, as the reference's ``mask[i:i+span] = 1``) and are
    added until at least M columns are masked; the masked columns beyond the first M (counting from
    time 0) are then unmasked, so exactly M columns are masked.
    """
    r = _check_ratio(mask_ratio)
    F, T = grid_size
    if span < 1:
        raise ValueError(f'cont_mask span must be >= 1 time patches, got {span}')
    span = min(span, T)
    M = int(T * r)
    t = torch.arange(T, device=device)
    cols = torch.zeros(batch, T, dtype=torch.bool, device=device)
    # Each round adds one span to every sample still short of M; a loop over rounds, not samples.
    while M > 0:
        need = cols.sum(1) < M
        if not bool(need.any()):
            break
        start = (_rand((batch,), device, generator) * T).long().clamp_(max=T - 1)
        new = (t[None] >= start[:, None]) & (t[None] < start[:, None] + span)
        cols |= new & need[:, None]
    cols &= cols.cumsum(1) <= M
    masked = cols[:, None, :].expand(batch, F, T).reshape(batch, F * T)
    return _shuffled_from_binary(masked, generator)


def _shuffled_from_binary(masked: torch.Tensor, generator: torch.Generator | None) -> Mask:
    """Like `mask_from_binary`, but visible and masked patches each in random order (as MAE's shuffle)."""
    noise = _rand(tuple(masked.shape), masked.device, generator)
    counts = masked.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f'every sample must mask the same number of patches, got counts {counts.tolist()}')
    ids_shuffle = torch.argsort(noise + masked.float() * 2.0, dim=1)
    return Mask(_inverse(ids_shuffle), masked.shape[1] - (int(counts[0]) if counts.numel() else 0))


def make_mask(mask_type: str, batch: int, grid_size: tuple[int, int], mask_ratio: float, cont_mask: int = 0,
              device: torch.device | str | None = None, generator: torch.Generator | None = None) -> Mask:
    """Draw a mask of kind `mask_type` (one of `MASK_TYPES`) for a ``Fp x Tp`` patch grid."""
    if mask_type == 'unstructured':
        return random_mask(batch, grid_size[0] * grid_size[1], mask_ratio, device, generator)
    if mask_type == 'structured':
        return structured_mask(batch, grid_size, mask_ratio, device, generator)
    if mask_type == 'time_continuous':
        return time_continuous_mask(batch, grid_size, mask_ratio, cont_mask, device, generator)
    raise ValueError(f'mask_type must be one of {MASK_TYPES}, got {mask_type!r}')


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b]]`` for tokens ``x`` ``[B, L, D]`` and indices ``ids`` ``[B, N]`` -> ``[B, N, D]``."""
    return torch.gather(x, 1, ids[:, :, None].expand(-1, -1, x.shape[-1]))


def restore_order(x_shuffled: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Tokens in shuffle order (visible then masked) ``[B, L, D]`` -> original patch order."""
    return gather_tokens(x_shuffled, ids_restore)
