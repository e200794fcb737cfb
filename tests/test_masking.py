"""Patch masks: counts, permutations, structure, determinism."""

from __future__ import annotations

import pytest
import torch

from m2d.masking import (Mask, as_mask, gather_tokens, keep_selected, make_mask, mask_from_binary, random_mask,
                         restore_order, structured_mask, structured_selection, structured_training_mask,
                         time_continuous_mask)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_permutation(m: Mask) -> None:
    B, L = m.ids_restore.shape
    ar = torch.arange(L).expand(B, L)
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), ar)  # ids_restore inverts ids_shuffle
    assert torch.equal(torch.sort(m.ids_restore, dim=1).values, ar)
    binary = m.binary()
    assert torch.equal(binary.sum(1), torch.full((B,), float(L - m.len_keep)))
    assert torch.equal(torch.gather(binary, 1, m.ids_keep), torch.zeros(B, m.len_keep))
    assert torch.equal(torch.gather(binary, 1, m.ids_masked), torch.ones(B, L - m.len_keep))


@pytest.mark.parametrize('L,ratio', [(65, 0.7), (52, 0.6), (190, 0.75), (10, 0.0)])
def test_random_mask_counts_and_inverse(L, ratio):
    m = random_mask(8, L, ratio, generator=_gen(1))
    assert m.len_keep == int(L * (1 - ratio))
    _check_permutation(m)


def test_seeded_determinism():
    for kind, kw in [('unstructured', {}), ('structured', {}), ('time_continuous', {'cont_mask': 5})]:
        a = make_mask(kind, 4, (5, 38), 0.7, generator=_gen(3), **kw)
        b = make_mask(kind, 4, (5, 38), 0.7, generator=_gen(3), **kw)
        c = make_mask(kind, 4, (5, 38), 0.7, generator=_gen(4), **kw)
        assert torch.equal(a.ids_restore, b.ids_restore) and a.len_keep == b.len_keep, kind
        assert not torch.equal(a.ids_restore, c.ids_restore), kind


def test_samples_differ_within_a_batch():
    m = random_mask(4, 65, 0.7, generator=_gen(0))
    assert not torch.equal(m.binary()[0], m.binary()[1])


def test_structured_mask_is_rows_and_columns():
    F, T, B = 5, 38, 16
    seen_nf = set()
    for seed in range(20):
        m = structured_mask(B, (F, T), 0.6, generator=_gen(seed))
        _check_permutation(m)
        grid = m.binary().reshape(B, F, T).bool()
        rows = grid.all(2)  # fully masked frequency rows
        cols = grid.all(1)  # fully masked time columns
        assert torch.equal(grid, rows[:, :, None] | cols[:, None, :])
        nf = rows.sum(1)
        seen_nf.add(int(nf[0]))
        assert int(nf.max()) <= F - 1
        assert int(grid.sum(1).sum(1).unique().numel()) == 1
    assert len(seen_nf) > 1  # NF is drawn per batch


@pytest.mark.parametrize('span,ratio', [(5, 0.6), (1, 0.5), (10, 0.3), (60, 0.6)])
def test_time_continuous_mask(span, ratio):
    F, T, B = 2, 52, 32
    m = time_continuous_mask(B, (F, T), ratio, span, generator=_gen(7))
    _check_permutation(m)
    grid = m.binary().reshape(B, F, T).bool()
    assert torch.equal(grid, grid[:, :1].expand(B, F, T))  # every row of a masked column is masked
    cols = grid[:, 0]
    assert torch.equal(cols.sum(1), torch.full((B,), int(T * ratio)))
    span = min(span, T)
    for b in range(B):  # runs of masked columns are whole spans, except the trimmed last one
        c = cols[b].tolist()
        runs, n = [], 0
        for v in c + [False]:
            if v:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        assert all(r >= span for r in runs[:-1]), runs


def test_gather_restore_roundtrip_and_binary():
    x = torch.randn(3, 20, 4)
    m = random_mask(3, 20, 0.5, generator=_gen(2))
    shuffled = gather_tokens(x, m.ids_shuffle)
    assert torch.equal(restore_order(shuffled, m.ids_restore), x)
    assert torch.equal(shuffled[:, :m.len_keep], gather_tokens(x, m.ids_keep))
    back = mask_from_binary(m.binary().bool())
    assert torch.equal(back.binary(), m.binary()) and back.len_keep == m.len_keep
    with pytest.raises(ValueError, match='same number'):
        mask_from_binary(torch.tensor([[True, False], [True, True]]))


def test_as_mask_checks():
    ids = torch.arange(6).expand(2, 6)
    m = as_mask((ids, torch.tensor(4)))
    assert m.len_keep == 4 and m.num_masked == 2
    with pytest.raises(ValueError, match='len_keep'):
        as_mask((ids, 7))
    with pytest.raises(TypeError):
        as_mask(ids)
    with pytest.raises(ValueError, match='mask_type'):
        make_mask('blocks', 2, (5, 10), 0.5)
    with pytest.raises(ValueError, match='cont_mask'):
        time_continuous_mask(2, (5, 10), 0.5, 0)


# ---------------------------------------------------------------------------------------------
# the fine-tuning mask (--training_mask): the patches the reference's runtime keeps


def _reference_kept(rows: list[list[int]], cols: list[list[int]], grid: tuple[int, int]) -> torch.Tensor:
    """nttcslab/m2d ``random_structured_mask`` + ``random_masking`` on fixed draws, transcribed: the
    selected rows/columns set to 1, ``argsort(mask, descending=True)``, the first "number of zeros"
    kept. The sort is taken stable: CUDA's sort is for more than 32 entries (only its bitonic sort of
    <= 32 is not), and the reference fine-tunes on CUDA."""
    F, T = grid
    B = len(rows)
    mask = torch.zeros((B, F, T), dtype=torch.int)
    for b in range(B):
        mask[b, rows[b]] = 1
    for b in range(B):
        mask[b, :, cols[b]] = 1
    ids_shuffle = torch.argsort(mask.view(B, -1), descending=True, stable=True)
    len_keep = int((mask[0] == 0).sum())
    return ids_shuffle[:, :len_keep]


def _selection(rows: list[list[int]], cols: list[list[int]], grid: tuple[int, int]) -> torch.Tensor:
    F, T = grid
    sel = torch.zeros(len(rows), F, T, dtype=torch.bool)
    for b, (r, c) in enumerate(zip(rows, cols)):
        sel[b, r] = True
        sel[b, :, c] = True
    return sel.reshape(len(rows), F * T)


def test_training_mask_keeps_the_selected_patches_by_hand():
    # 3 x 4 grid, column 1 selected: 3 selected, 9 unselected -> the 3 selected, then the first 6
    # unselected patches in index order (the tie among zeros broken by index).
    m = keep_selected(_selection([[]], [[1]], (3, 4)))
    assert m.len_keep == 9
    assert m.ids_keep.tolist() == [[1, 5, 9, 0, 2, 3, 4, 6, 7]]
    # 3 x 4 grid, rows 0 and 2 selected: 8 selected, 4 unselected -> the first 4 selected (a cut
    # among the tied ones: row 0).
    m = keep_selected(_selection([[0, 2]], [[]], (3, 4)))
    assert m.ids_keep.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize('nf', [0, 1, 2, 4])
def test_training_mask_matches_the_reference_transcription(nf):
    F, T, ratio = 5, 38, 0.5
    nt = int(T * max(ratio + 0.5 / T - nf / F, 0.0))  # the reference's NT for this NF
    g = torch.Generator().manual_seed(nf)
    rows = [torch.randperm(F, generator=g)[:nf].tolist() for _ in range(6)]
    cols = [torch.randperm(T, generator=g)[:nt].tolist() for _ in range(6)]
    sel = _selection(rows, cols, (F, T))
    ours = keep_selected(sel)
    ref = _reference_kept(rows, cols, (F, T))
    assert torch.equal(ours.ids_keep, ref)  # same patches, same order
    _check_permutation(ours)
    n_sel = int(sel[0].sum())
    if nf == 1:  # the case: a cross (1 row + 11 columns = 82 patches) plus 26 unselected ones
        assert (nt, n_sel, ours.len_keep) == (11, 82, 108)
    kept = torch.zeros_like(sel).scatter_(1, ours.ids_keep, True)
    if n_sel <= ours.len_keep:  # every selected patch kept, topped up by the lowest unselected indices
        assert bool((kept | ~sel).all())
        for b in range(6):
            unsel = (~sel[b]).nonzero().flatten()
            assert torch.equal(kept[b] & ~sel[b], torch.zeros_like(sel[b]).index_fill_(
                0, unsel[:ours.len_keep - n_sel], True))
    else:  # cut: the first len_keep selected patches in index order, nothing unselected
        assert not bool((kept & ~sel).any())


def test_training_mask_draws_the_rows_and_columns_of_the_structured_mask():
    for seed in range(5):
        sel = structured_selection(4, (5, 38), 0.5, generator=_gen(seed))
        pre = structured_mask(4, (5, 38), 0.5, generator=_gen(seed))  # pre-training: the selection is masked
        assert torch.equal(pre.binary().bool(), sel)
        fine = structured_training_mask(4, (5, 38), 0.5, generator=_gen(seed))
        assert torch.equal(fine.ids_keep, keep_selected(sel).ids_keep)
        assert fine.len_keep == pre.len_keep  # the same count, other patches
