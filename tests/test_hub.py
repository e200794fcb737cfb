"""Released weights by name (m2d.hub): download from a local HTTP server, cache, resume, errors."""

from __future__ import annotations

import argparse
import http.server
import io
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import m2d
from m2d import hub
from m2d.cli import main
from m2d.runtime import RuntimeM2D
from m2d.vit import ViTConfig, ViTEncoder

NAME = 'm2d_vit_base-80x608p16x16-221006-mr7'  # a real released name; the served zip holds a tiny model


def tiny_checkpoint(path: Path, seed: int, epoch: int) -> Path:
    """A small M2D checkpoint in the official layout ({'model', 'epoch', 'args'}, decoder keys included)."""
    torch.manual_seed(seed)
    enc = ViTEncoder(ViTConfig(input_size=(80, 608), embed_dim=64, depth=2, num_heads=1))
    for p in enc.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    sd = dict(enc.state_dict())
    sd['norm_stats'] = torch.tensor([-7.5 + seed, 4.5])
    sd['decoder_embed.weight'] = torch.zeros(32, 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'model': sd, 'epoch': epoch, 'args': argparse.Namespace(model='m2d_vit_base', seed=seed)}, path)
    return path


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', compression) as z:
        for arcname, data in files.items():
            z.writestr(arcname, data)
    return buf.getvalue()


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """(zip bytes of NAME with checkpoint-9 and checkpoint-10, path of a copy of checkpoint-10)."""
    src = tmp_path_factory.mktemp('release') / NAME
    best = tiny_checkpoint(src / 'checkpoint-10.pth', seed=1, epoch=10)
    older = tiny_checkpoint(src / 'checkpoint-9.pth', seed=2, epoch=9)
    data = zip_bytes({f'{NAME}/checkpoint-9.pth': older.read_bytes(), f'{NAME}/checkpoint-10.pth': best.read_bytes(),
                      f'{NAME}/log.txt': b'train log'})
    return data, best


class Server:
    """A local release server on 127.0.0.1 (ephemeral port) serving {'/TAG/NAME.zip': bytes}.

    `cut_next`: this many next responses send only half of the body and close the connection.
    `ignore_range`: answer Range requests with the whole file (200), as some servers do.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_next = 0
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get('Range')
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                m = re.fullmatch(r'bytes=(\d+)-', rng or '')
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if server.cut_next:
                    server.cut_next -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch, tmp_path):
    srv = Server()
    monkeypatch.setenv('M2D_RELEASE_URL', srv.url)
    monkeypatch.setenv('M2D_CACHE', str(tmp_path / 'cache'))
    yield srv
    srv.stop()


def cache_entries(tmp_path) -> list[str]:
    root = tmp_path / 'cache'
    return sorted(p.relative_to(root).as_posix() for p in root.rglob('*')) if root.exists() else []


def test_release_table():
    assert len(hub.RELEASES) == 15
    assert hub.RELEASES['m2d_clap_vit_base-80x608p16x16-240128'].tag == 'v0.1.0'
    assert hub.RELEASES['m2d_s_vit_base-80x400p80x2-230201'].tag == 'v0.2.0'
    assert hub.RELEASES['m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly'].tag == 'v0.3.0'
    assert hub.is_released_name(NAME) and not hub.is_released_name('m2d_vit_base')
    assert (hub.release_url(NAME, base_url='https://example.org/dl/')
            == f'https://example.org/dl/v0.1.0/{NAME}.zip')


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv('M2D_CACHE', raising=False)
    assert hub.cache_dir() == Path.home() / '.cache' / 'm2d'
    monkeypatch.setenv('M2D_CACHE', str(tmp_path / 'env'))
    assert hub.cache_dir() == tmp_path / 'env'
    assert hub.cache_dir(tmp_path / 'arg') == tmp_path / 'arg'


def test_download_load_and_cache(server, release, tmp_path):
    data, best = release
    server.files[f'/v0.1.0/{NAME}.zip'] = data
    runtime = m2d.load(NAME)
    weights = tmp_path / 'cache' / NAME / 'checkpoint-10.pth'
    assert Path(runtime.weight_file) == weights  # the highest epoch, not the last in string order
    assert weights.read_bytes() == best.read_bytes()
    assert cache_entries(tmp_path) == [NAME, f'{NAME}/checkpoint-10.pth', f'{NAME}/checkpoint-9.pth',
                                       f'{NAME}/log.txt']  # no zip, no .part, no temp folder
    wav = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16000)).astype(np.float32))
    direct = RuntimeM2D(best)
    with torch.inference_mode():
        assert torch.equal(runtime.encode(wav), direct.encode(wav))
    assert len(server.requests) == 1

    server.stop()  # the second call must not need the network
    again = m2d.load(NAME)
    assert Path(again.weight_file) == weights
    assert hub.resolve_weights(NAME) == weights
    assert len(server.requests) == 1


def test_interrupted_download_is_resumed(server, release, tmp_path):
    data, _ = release
    server.files[f'/v0.1.0/{NAME}.zip'] = data
    server.cut_next = 1
    with pytest.raises(hub.InterruptedDownload, match='interrupted'):
        hub.download(NAME, progress=False, retries=0)
    part = tmp_path / 'cache' / f'{NAME}.zip.part'
    assert part.stat().st_size == len(data) // 2
    assert not (tmp_path / 'cache' / NAME).exists()
    assert m2d.hub.cached_weights(NAME) is None

    weights = hub.download(NAME, progress=False, retries=0)
    assert server.requests[-1] == (f'/v0.1.0/{NAME}.zip', f'bytes={len(data) // 2}-')
    assert weights.name == 'checkpoint-10.pth' and not part.exists()


def test_interruption_retried_within_one_call(server, release):
    data, _ = release
    server.files[f'/v0.1.0/{NAME}.zip'] = data
    server.cut_next = 2
    weights = hub.download(NAME, progress=False, retries=2)
    assert weights.is_file()
    ranges = [r for _, r in server.requests]
    assert ranges == [None, f'bytes={len(data) // 2}-', f'bytes={len(data) // 2 + (len(data) - len(data) // 2) // 2}-']


def test_server_ignoring_range_restarts(server, release, tmp_path):
    data, best = release
    server.files[f'/v0.1.0/{NAME}.zip'] = data
    (tmp_path / 'cache').mkdir()
    (tmp_path / 'cache' / f'{NAME}.zip.part').write_bytes(b'garbage that is not the start of the zip')
    server.ignore_range = True
    weights = hub.download(NAME, progress=False)
    assert server.requests[0][1] is not None  # a Range request was made ...
    assert weights.read_bytes() == best.read_bytes()  # ... and the full 200 answer replaced the part


@pytest.mark.parametrize('kind', ['not_a_zip', 'bad_crc', 'no_weights'])
def test_bad_release_zip(server, release, tmp_path, kind):
    data, _ = release
    if kind == 'not_a_zip':
        data, match = b'<html>rate limited</html>' * 40, 'not a valid zip'
    elif kind == 'bad_crc':
        data = bytearray(zip_bytes({f'{NAME}/checkpoint-10.pth': bytes(range(256)) * 64}, zipfile.ZIP_STORED))
        data[len(data) // 3] ^= 0xFF
        data, match = bytes(data), 'corrupt'
    else:
        data, match = zip_bytes({f'{NAME}/README.txt': b'no weights here'}), r'holds no \.pth'
    server.files[f'/v0.1.0/{NAME}.zip'] = data
    with pytest.raises(hub.DownloadError, match=match):
        hub.download(NAME, progress=False)
    assert cache_entries(tmp_path) == []


def test_http_error_names_url(server, tmp_path):
    with pytest.raises(hub.DownloadError, match=r'HTTP 404.*' + re.escape(f'/v0.1.0/{NAME}.zip')):
        hub.download(NAME, progress=False)
    assert cache_entries(tmp_path) == []


def test_unreachable_server(server, tmp_path):
    server.stop()
    with pytest.raises(hub.DownloadError, match='cannot reach .*Without network access'):
        hub.download(NAME, progress=False)
    assert cache_entries(tmp_path) == []


def test_unknown_name(server, tmp_path):
    typo = 'm2d_vit_base-80x608p16x16-221006-mr8'
    with pytest.raises(hub.UnknownModelError, match=f'Did you mean: .*{NAME}'):
        hub.download(typo)
    with pytest.raises(hub.UnknownModelError, match='not a released M2D model'):
        hub.resolve_weights('no-such-model')
    with pytest.raises(hub.UnknownModelError, match=f'Did you mean: .*{NAME}'):
        m2d.load(typo)  # a name-like argument gets the same hint
    with pytest.raises(FileNotFoundError, match='no such weight file'):
        m2d.load(str(tmp_path / 'missing' / 'checkpoint-1.pth'))
    assert server.requests == [] and cache_entries(tmp_path) == []


def test_download_command(server, release, tmp_path, capsys):
    server.files[f'/v0.1.0/{NAME}.zip'] = release[0]
    other = tmp_path / 'other'
    assert main(['download', NAME, '--cache', str(other), '--quiet']) == 0
    assert capsys.readouterr().out.strip() == str(other / NAME / 'checkpoint-10.pth')
    assert main(['download', '--list', '--cache', str(other)]) == 0
    listing = capsys.readouterr().out
    assert f'{NAME}' in listing and str(other / NAME / 'checkpoint-10.pth') in listing
    assert 'm2d_s_vit_base-80x608p80x2-230220' in listing and len(listing.strip().splitlines()) == 16
    assert main(['download', 'm2d_vit_base-80x608p16x16-221006-mr8', NAME, '--cache', str(other)]) == 2
    assert 'Did you mean' in capsys.readouterr().err  # every name is checked before any download


def test_recorded_sha256_is_verified(server, release, tmp_path, monkeypatch):
    import hashlib

    data, best = release
    server.files[f'/v0.1.0/{NAME}.zip'] = data
    good = hashlib.sha256(data).hexdigest()
    bad = hashlib.sha256(b'another archive').hexdigest()
    monkeypatch.setitem(hub.RELEASES, NAME, hub.Release('v0.1.0', bad))
    with pytest.raises(hub.DownloadError) as e:
        hub.download(NAME, progress=False)
    assert f'{NAME}.zip' in str(e.value) and good in str(e.value) and bad in str(e.value)
    assert isinstance(e.value, m2d.errors.M2DError) and cache_entries(tmp_path) == []  # the download was deleted
    monkeypatch.setitem(hub.RELEASES, NAME, hub.Release('v0.1.0', good.upper()))
    assert hub.download(NAME, progress=False).read_bytes() == best.read_bytes()
    assert not any(r.sha256 for r in hub.RELEASES.values() if r is not hub.RELEASES[NAME])  # none recorded yet
