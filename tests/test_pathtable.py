import pickle

import numpy as np
import pytest

from m2d.data.pathtable import PathTable

NAMES = ['lms/a/1.npy', 'lms/bé/22.npy', '', 'c.npy']


def test_names_round_trip_with_unicode_and_empty_names():
    t = PathTable.from_names(NAMES)
    assert len(t) == 4 and list(t) == NAMES
    assert t[1] == 'lms/bé/22.npy' and t[-1] == 'c.npy' and t[2] == ''
    with pytest.raises(IndexError):
        t[4]


def test_take_slice_and_repeat_follow_list_semantics():
    t = PathTable.from_names(NAMES)
    assert list(t.take([3, 0, 0, 1])) == [NAMES[i] for i in (3, 0, 0, 1)]
    assert list(t[1:3]) == NAMES[1:3]
    assert list(t.repeat_to(10)) == [NAMES[i % 4] for i in range(10)]
    assert t.repeat_to(2) is t
    empty = PathTable.from_names([])
    assert len(empty) == 0 and list(empty.take([])) == [] and len(empty.repeat_to(5)) == 0
    with pytest.raises(IndexError):
        t.take([4])


def test_two_buffers_whatever_the_length_and_pickles():
    t = PathTable.from_names(f'lms/{i:07d}.npy' for i in range(10000))
    assert t.blob.dtype == np.uint8 and t.ends.dtype == np.int64
    assert t.nbytes == 10000 * 15 + 10000 * 8
    assert not t.blob.flags.writeable
    u = pickle.loads(pickle.dumps(t))
    assert u == t and u[9999] == 'lms/0009999.npy'


def test_iteration_crosses_chunks_and_write_filelist_sorts_whatever_it_is_given(tmp_path):
    from m2d.data.filelist import FILES_CSV, write_filelist

    names = [f'{i:05d}.npy' for i in range(9000)]
    assert list(PathTable.from_names(names)) == names  # iterated 4096 ends at a time
    folder = tmp_path / 'lms'
    folder.mkdir()
    shuffled = names[::-1]
    expected = 'file_name\n' + ''.join(f'lms/{n}\n' for n in names)
    for given in (iter(names), iter(shuffled), names, shuffled, set(names), PathTable.from_names(shuffled)):
        write_filelist(folder, names=given)
        assert (folder / FILES_CSV).read_text().replace('\r\n', '\n') == expected, type(given)
