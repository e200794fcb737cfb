"""`m2d datasets fsdd`: from a local folder, a local zip, or a URL served on 127.0.0.1 (no network)."""

from __future__ import annotations

import csv
import functools
import http.server
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from m2d.cli import main
from m2d.data.convert import convert
from m2d.data.fsdd import prepare_fsdd


def _rows(path: Path) -> list[dict]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _subset(fsdd_dir: Path, n: int) -> list[str]:
    names = sorted(os.listdir(fsdd_dir))
    return names[::len(names) // n][:n]


def make_zip(fsdd_dir: Path, path: Path, names: list[str]) -> Path:
    """A zip laid out like GitHub's archive of the repository."""
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('free-spoken-digit-dataset-master/README.md', 'FSDD')
        z.writestr('free-spoken-digit-dataset-master/utils/notes.wav', b'not a recording')
        for name in names:
            z.write(fsdd_dir / name, f'free-spoken-digit-dataset-master/recordings/{name}')
    return path


def test_local_folder_link_metadata_and_convert(fsdd_dir, tmp_path):
    r = prepare_fsdd(tmp_path / 'fsdd', fsdd_dir.parent, link=True, progress=False)  # folder holding recordings/
    assert r.files == 3000 and r.added == 3000
    rows = _rows(r.metadata)
    assert len(rows) == 3000 and set(rows[0]) == {'file', 'digit', 'speaker', 'index', 'split'}
    assert {row['speaker'] for row in rows} == {'george', 'jackson', 'lucas', 'nicolas', 'theo', 'yweweler'}
    assert sum(row['split'] == 'test' for row in rows) == 300
    row = next(x for x in rows if x['file'] == 'recordings/7_theo_3.wav')
    assert (row['digit'], row['speaker'], row['index'], row['split']) == ('7', 'theo', '3', 'test')
    assert (tmp_path / 'fsdd' / row['file']).resolve() == (fsdd_dir / '7_theo_3.wav').resolve()
    again = prepare_fsdd(tmp_path / 'fsdd', fsdd_dir, link=True, progress=False)
    assert again.added == 0 and again.files == 3000
    # end to end on a copied subset: prepare, convert, list
    sub = tmp_path / 'some'
    sub.mkdir()
    for name in _subset(fsdd_dir, 12):
        (sub / name).symlink_to(fsdd_dir / name)
    assert main(['datasets', 'fsdd', str(tmp_path / 'small'), '--source', str(sub), '--no-progress']) == 0
    copied = tmp_path / 'small' / 'recordings'
    assert not any(p.is_symlink() for p in copied.iterdir()) and len(list(copied.iterdir())) == 12
    s = convert(copied, tmp_path / 'data' / 'lms_fsdd', workers=0, progress=False)
    assert s.converted == 12
    listed = [x['file_name'] for x in _rows(tmp_path / 'data' / 'lms_fsdd' / 'files.csv')]
    assert listed == sorted(f'lms_fsdd/{Path(n).stem}.npy' for n in _subset(fsdd_dir, 12))
    assert np.load(tmp_path / 'data' / listed[0]).shape[:2] == (1, 80)


def test_zip_from_file_url_local_zip_and_errors(fsdd_dir, tmp_path):
    names = _subset(fsdd_dir, 10)
    z = make_zip(fsdd_dir, tmp_path / 'master.zip', names)
    r = prepare_fsdd(tmp_path / 'a', z.as_uri(), progress=False)
    assert r.files == 10 and r.added == 10 and not (tmp_path / 'a' / 'fsdd.zip').exists()
    for name in names:
        assert (tmp_path / 'a' / 'recordings' / name).read_bytes() == (fsdd_dir / name).read_bytes()
    assert not (tmp_path / 'a' / 'recordings' / 'notes.wav').exists()
    assert prepare_fsdd(tmp_path / 'b', z, progress=False).files == 10  # a local zip path
    bad = tmp_path / 'bad.zip'
    bad.write_text('not a zip')
    with pytest.raises(ValueError, match='bad.zip'):
        prepare_fsdd(tmp_path / 'c', bad, progress=False)
    empty = tmp_path / 'other.zip'
    with zipfile.ZipFile(empty, 'w') as zf:
        zf.writestr('x/readme.txt', 'nothing here')
    with pytest.raises(ValueError, match='recordings'):
        prepare_fsdd(tmp_path / 'c', empty, progress=False)
    with pytest.raises(FileNotFoundError, match='missing'):
        prepare_fsdd(tmp_path / 'c', tmp_path / 'missing', progress=False)


def test_download_over_http_on_localhost(fsdd_dir, tmp_path):
    names = _subset(fsdd_dir, 6)
    serve = tmp_path / 'serve'
    serve.mkdir()
    make_zip(fsdd_dir, serve / 'master.zip', names)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}'
        r = prepare_fsdd(tmp_path / 'dl', f'{url}/master.zip', progress=False)
        assert r.files == 6 and sorted(p.name for p in r.recordings.iterdir()) == sorted(names)
        with pytest.raises(OSError, match='cannot download'):
            prepare_fsdd(tmp_path / 'dl2', f'{url}/absent.zip', progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert not list((tmp_path / 'dl').glob('.*tmp*'))
