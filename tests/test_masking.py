"""Patch masks: counts, permutations, structure, determinism."""

from __future__ import annotations

import pytest
import torch

from m2d.masking import (Mask, as_mask, gather_tokens, make_mask, mask_from_binary, random_mask, restore_order,
                         structured_mask, time_continuous_mask)


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
