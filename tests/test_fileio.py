"""File modes of atomic writes: new files follow the umask, replaced files keep their mode."""

import os

import pytest

from m2d.fileio import atomic_path


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_file_gets_umask_mode(tmp_path, umask_022):
    dst = tmp_path / 'a.txt'
    with atomic_path(dst) as tmp:
        tmp.write_text('x')
    assert oct(dst.stat().st_mode & 0o777) == oct(0o644)


def test_replaced_file_keeps_its_mode(tmp_path, umask_022):
    dst = tmp_path / 'hub.py'
    dst.write_text('old')
    os.chmod(dst, 0o640)
    with atomic_path(dst) as tmp:
        tmp.write_text('new')
    assert dst.read_text() == 'new'
    assert oct(dst.stat().st_mode & 0o777) == oct(0o640)


def test_failed_write_leaves_old_file(tmp_path):
    dst = tmp_path / 'keep.txt'
    dst.write_text('old')
    with pytest.raises(RuntimeError), atomic_path(dst) as tmp:
        tmp.write_text('half')
        raise RuntimeError('boom')
    assert dst.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['keep.txt']
