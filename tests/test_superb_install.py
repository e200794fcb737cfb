"""`m2d superb install/uninstall` on a fake s3prl tree: idempotent, dry runs, round trip, file modes kept."""

import os
import stat

import pytest

from m2d.cli import main
from m2d.superb import SuperbError
from m2d.superb.install import FILES, HUB_LINE, install, uninstall

HUB_TEXT = ('"""s3prl hub"""\nfrom s3prl.upstream.wav2vec2.hubconf import *\n'
            'from s3prl.upstream.hubert.hubconf import *\n')


@pytest.fixture
def tree(tmp_path):
    """A fake s3prl checkout: ROOT/s3prl/hub.py (mode 644) and ROOT/s3prl/upstream/."""
    hub = tmp_path / 's3prl' / 'hub.py'
    (hub.parent / 'upstream').mkdir(parents=True)
    hub.write_text(HUB_TEXT)
    os.chmod(hub, 0o644)
    return tmp_path


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_uninstall_round_trip_keeps_modes(tree):
    hub = tree / 's3prl' / 'hub.py'
    old_umask = os.umask(0o022)
    try:
        up, changes = install(tree)
        assert len(changes) == 4 and up == tree / 's3prl' / 'upstream' / 'm2d'
        assert hub.read_text() == HUB_TEXT + HUB_LINE + '\n'
        assert mode(hub) == 0o644  # not mkstemp's 600
        assert {p.name for p in up.iterdir()} == set(FILES)
        assert all(mode(up / name) == 0o644 for name in FILES)  # new files: 666 & ~umask
        assert install(tree)[1] == []  # idempotent
        assert hub.read_text().count(HUB_LINE) == 1
        (up / '__pycache__').mkdir()  # left by s3prl importing the upstream
        (up / '__pycache__' / 'hubconf.cpython-311.pyc').write_bytes(b'x')
        changes = uninstall(tree)
        assert len(changes) == 2
        assert hub.read_text() == HUB_TEXT and mode(hub) == 0o644
        assert not up.exists() and (tree / 's3prl' / 'upstream').is_dir()
        assert uninstall(tree) == []
    finally:
        os.umask(old_umask)


def test_group_writable_hub_stays_so(tree):
    hub = tree / 's3prl' / 'hub.py'
    os.chmod(hub, 0o664)
    install(tree)
    assert mode(hub) == 0o664
    uninstall(tree)
    assert mode(hub) == 0o664


def test_dry_runs_change_nothing(tree, capsys):
    hub = tree / 's3prl' / 'hub.py'
    assert main(['superb', 'install', str(tree), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert out.count('would write') == 3 and f'would add "{HUB_LINE}"' in out
    assert hub.read_text() == HUB_TEXT and not (tree / 's3prl' / 'upstream' / 'm2d').exists()
    assert main(['superb', 'install', str(tree)]) == 0
    capsys.readouterr()
    assert main(['superb', 'uninstall', str(tree), '--dry_run']) == 0
    out = capsys.readouterr().out
    assert 'would remove' in out and hub.read_text().count(HUB_LINE) == 1
    assert main(['superb', 'install', str(tree), '--dry-run']) == 0
    assert 'nothing to do' in capsys.readouterr().out


def test_install_replaces_an_edited_file_and_uninstall_keeps_foreign_files(tree):
    up, _ = install(tree)
    (up / 'expert.py').write_text('# edited\n')
    assert install(tree, dry_run=True)[1] == [f'replace {up / "expert.py"}']
    install(tree)
    (up / 'm2d').mkdir()  # the reference's manual install put the whole M2D repository here
    with pytest.raises(SuperbError, match=r'did not write \(m2d\)'):
        uninstall(tree)
    assert (tree / 's3prl' / 'hub.py').read_text().count(HUB_LINE) == 1  # nothing changed


def test_wrong_path_is_one_line(tmp_path, capsys):
    assert main(['superb', 'install', str(tmp_path / 'nowhere')]) == 2
    err = capsys.readouterr().err
    assert 'no s3prl/hub.py' in err and err.count('\n') == 1
    with pytest.raises(SuperbError, match='hub.py'):
        uninstall(tmp_path)


def test_installed_hubconf_builds_the_experts_as_s3prl_calls_them(tree, small_ckpt):
    """s3prl calls `getattr(hub, NAME)(ckpt=..., model_config=..., refresh=...)`; the installed entries accept that."""
    import importlib.util

    import torch

    up, _ = install(tree)
    spec = importlib.util.spec_from_file_location('installed_hubconf', up / 'hubconf.py')
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    expert = hubconf.m2d(ckpt=f'{small_ckpt},-11.5,4.3', model_config=None, refresh=False)
    assert expert.runtime.norm_stats.tolist() == pytest.approx([-11.5, 4.3])
    with torch.no_grad():
        out = expert([torch.zeros(16000), torch.zeros(8000)])
    assert len(out['hidden_states']) == 2
    calcnorm = hubconf.m2d_calcnorm(ckpt=str(small_ckpt), model_config=None, refresh=False)
    assert calcnorm.max_updates == 10000
    with pytest.raises(SuperbError, match='no M2D weight file'):
        hubconf.m2d_calcnorm(ckpt=None, model_config=None, refresh=False)
