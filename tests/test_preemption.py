"""Preemption-safe pre-training: SIGTERM/SIGUSR1 stop every rank at one step with checkpoint-last.pth and
exit status 75; the same command with --resume auto ends with the weights of an uninterrupted run (one
process and two torchrun "nodes" on 127.0.0.1); rank 0 decides what to resume and a rank that cannot
read it stops every rank with one line; stale temporary files are removed; the default run folder
name is the same for the same command; --eval_device."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fsdd_lms_csv

TINY = ['--model', 'm2d_vit_tiny', '--depth', '1', '--decoder_depth', '1', '--decoder_embed_dim', '64',
        '--decoder_num_heads', '2', '--input_size', '80x96', '--min_ds_size', '0', '--feature_eval_freq', '0',
        '--norm_stats=-2.2,4.7', '--warmup_epochs', '1', '--log_every', '1', '--device', 'cpu',
        '--save_every_minutes', '0']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
EXIT_STOPPED = 75

# `m2d pretrain` whose process, after step AT, writes 'at-step-AT-rank-R' and waits for a stop signal
# (rank 1 of a two-rank run does not wait: it blocks in the next step's all-reduce until rank 0 goes on)
PAUSING_PRETRAIN = """
import argparse, logging, os, pathlib, sys, time
from m2d.commands import pretrain
from m2d.train import preemption

logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')

at = int(sys.argv[1])
rank = int(os.environ.get('RANK', '0'))
def pause(step):
    if step == at:
        pathlib.Path(f'at-step-{step}-rank-{rank}').touch()
        deadline = time.monotonic() + 120
        while rank == 0 and preemption.received() is None and time.monotonic() < deadline:
            time.sleep(0.02)

import m2d.train.loop as loop
train = loop.train
loop.train = lambda opts: train(opts, on_step=pause)
parser = argparse.ArgumentParser()
pretrain.add_arguments(parser)
sys.exit(pretrain.run(parser.parse_args(sys.argv[2:])))
"""


def load_ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca['step'] == cb['step']
    differ = [k for k in ca['model'] if not torch.equal(ca['model'][k], cb['model'][k])]
    assert not differ, f'weights differ after resume: {differ[:5]}'
    sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f'{path.name} never appeared'
        time.sleep(0.05)


@pytest.fixture(scope='module')
def lms_csv(tmp_path_factory) -> Path:
    """16 FSDD recordings as LMS .npy files (+ files.csv)."""
    return fsdd_lms_csv(tmp_path_factory.mktemp('fsdd'), 150, 16)


def test_stop_signals_set_a_flag_and_restore():
    from m2d.train import preemption

    before = signal.getsignal(signal.SIGUSR1)
    with preemption.StopSignals() as stop:
        assert not stop.requested and preemption.received() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert preemption.received() == signal.SIGUSR1  # and the process is still alive
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.received() == signal.SIGUSR1  # the first signal is the one reported
    assert signal.getsignal(signal.SIGUSR1) is before
    assert preemption.slurm_job_id({'SLURM_JOB_ID': '7'}) == '7'
    array_task = {'SLURM_JOB_ID': '8', 'SLURM_ARRAY_JOB_ID': '5', 'SLURM_ARRAY_TASK_ID': '2'}
    assert preemption.slurm_job_id(array_task) == '5_2'


def fake_scontrol(folder: Path) -> Path:
    """A stand-in `scontrol` on PATH that records its arguments in folder/scontrol.args."""
    folder.mkdir(exist_ok=True)
    exe = folder / 'scontrol'
    exe.write_text(f'#!/bin/sh\necho "$@" >> {folder / "scontrol.args"}\n')
    exe.chmod(0o755)
    return folder / 'scontrol.args'


def test_requeue_runs_scontrol_with_the_job_id(tmp_path, monkeypatch):
    from m2d.train import preemption

    calls = fake_scontrol(tmp_path / 'bin')
    monkeypatch.setenv('PATH', f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}')
    assert preemption.requeue({'SLURM_JOB_ID': '8', 'SLURM_ARRAY_JOB_ID': '5', 'SLURM_ARRAY_TASK_ID': '2'})
    assert calls.read_text() == 'requeue 5_2\n'
    assert not preemption.requeue({})  # not under SLURM: a warning, no call
    assert calls.read_text() == 'requeue 5_2\n'


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_bit_identical(lms_csv, tmp_path):
    # 16 files, batch 4: 4 steps per epoch, 2 epochs; a checkpoint only at the end of each epoch
    common = [*TINY, '--csv_main', str(lms_csv), '--batch_size', '4', '--epochs', '2', '--save_freq', '1',
              '--num_workers', '0']
    a = subprocess.run([sys.executable, '-m', 'm2d', 'pretrain', *common, '--output_dir', 'a'], cwd=tmp_path,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]

    # --slurm_requeue requeues after SIGUSR1 (time limit) only: SIGTERM (preemption, scancel) does not
    calls = fake_scontrol(tmp_path / 'bin')
    env = dict(ENV, SLURM_JOB_ID='99', PATH=f'{tmp_path / "bin"}{os.pathsep}{ENV["PATH"]}')
    # with loader workers, in a process group of its own: SIGTERM to every process, as SLURM sends it
    proc = subprocess.Popen([sys.executable, '-c', PAUSING_PRETRAIN, '5', *common, '--output_dir', 'b',
                             '--slurm_requeue', '--num_workers', '2'], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(tmp_path / 'at-step-5-rank-0', [proc])
    signalled_at = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    seconds = time.time() - signalled_at
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert seconds < 30, f'exit took {seconds:.1f} s after SIGTERM'
    assert 'stop requested (SIGTERM) at step 6' in err and 'stopped by SIGTERM at step 6' in err
    assert 'continue with --resume auto' in err
    last = tmp_path / 'b' / 'checkpoint-last.pth'
    ck = load_ckpt(last)
    assert (ck['step'], ck['epoch'], ck['iter_in_epoch']) == (6, 1, 2)  # the step after the signal, mid-epoch 2
    assert last.stat().st_mtime >= signalled_at - 1
    assert not (tmp_path / 'b' / 'checkpoint-2.pth').exists()
    assert not calls.exists()

    # leftovers of killed writes: ours go, anything else stays
    ours = [tmp_path / 'b' / n for n in ('.checkpoint-last.pth.ab_12cd3.tmp.pth', '.checkpoint-last.pth.tmp-link',
                                         '.log.jsonl.x1y2z3w4.tmp.jsonl')]
    others = [tmp_path / 'b' / n for n in ('.notes.txt.ab12cd34.tmp.txt', 'checkpoint-last.pth.tmp', 'mine.tmp')]
    for p in ours + others:
        p.write_bytes(b'x' * 10)
    r = subprocess.run([sys.executable, '-m', 'm2d', 'pretrain', *common, '--output_dir', 'b', '--resume', 'auto'],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resumed from' in r.stderr
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert_same_weights(tmp_path / 'a' / 'checkpoint-2.pth', tmp_path / 'b' / 'checkpoint-2.pth')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _nodes(args: list[str], cwds: list[Path], script: list[str] | None = None) -> list[subprocess.Popen]:
    """Two torchrun "nodes" (one process each) on 127.0.0.1."""
    port = _free_port()
    procs = []
    for node, cwd in enumerate(cwds):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--node_rank', str(node),
               '--nproc_per_node', '1', '--master_addr', '127.0.0.1', '--master_port', str(port),
               '--signals_to_handle', 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1',  # as the README's sbatch example
               *(script or ['-m', 'm2d', 'pretrain']), *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_two_nodes_sigterm_and_resume_equal_uninterrupted(lms_csv, tmp_path):
    script = tmp_path / 'pausing.py'
    script.write_text(PAUSING_PRETRAIN)
    # 16 files over 2 ranks x batch 2: 4 steps per epoch, 2 epochs
    common = [*TINY, '--csv_main', str(lms_csv), '--batch_size', '2', '--epochs', '2', '--save_freq', '1',
              '--num_workers', '0']
    runs = _finish(_nodes([*common, '--output_dir', 'a'], [tmp_path, tmp_path]))
    assert [rc for rc, _ in runs] == [0, 0], runs[0][1][-3000:] + runs[1][1][-3000:]

    procs = _nodes(['5', *common, '--output_dir', 'b'], [tmp_path, tmp_path], script=[str(script)])
    wait_for(tmp_path / 'at-step-5-rank-0', procs)
    # the scheduler signals every node's torchrun, which passes the signal on to its worker: SIGTERM
    # (preemption) to node 0, SIGUSR1 (time limit near; torchrun needs --signals_to_handle) to node 1
    procs[0].send_signal(signal.SIGTERM)
    procs[1].send_signal(signal.SIGUSR1)
    t0 = time.monotonic()
    runs = _finish(procs, timeout=90)
    assert time.monotonic() - t0 < 30
    for rc, err in runs:
        assert rc == 1, err[-3000:]  # torchrun reports the workers' 75 as 1 (it did not die of the signal)
        assert 'stopped by' in err and 'continue with --resume auto' in err, err[-3000:]
    assert 'stopped by SIGTERM at step 6' in runs[0][1]  # rank 0 got it; every rank stopped at step 6
    assert 'at step 6;' in runs[1][1]
    ck = load_ckpt(tmp_path / 'b' / 'checkpoint-last.pth')
    assert (ck['step'], ck['iter_in_epoch']) == (6, 2)

    runs = _finish(_nodes([*common, '--output_dir', 'b', '--resume', 'auto'], [tmp_path, tmp_path]))
    assert [rc for rc, _ in runs] == [0, 0], runs[0][1][-3000:] + runs[1][1][-3000:]
    assert 'resumed from b/checkpoint-last.pth: epoch 1, iteration 2' in runs[0][1]  # rank 0 logs for all
    assert_same_weights(tmp_path / 'a' / 'checkpoint-2.pth', tmp_path / 'b' / 'checkpoint-2.pth')


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_a_node_that_cannot_read_the_resume_file_stops_every_rank(lms_csv, tmp_path):
    """Node 1 runs in another folder: its view of the relative run folder 'run' lacks rank 0's checkpoint."""
    common = [*TINY, '--csv_main', str(lms_csv), '--batch_size', '2', '--epochs', '1', '--max_steps', '1',
              '--num_workers', '0', '--output_dir', 'run']
    node0, node1 = tmp_path / 'node0', tmp_path / 'node1'
    node0.mkdir()
    node1.mkdir()
    first = subprocess.run([sys.executable, '-m', 'm2d', 'pretrain', *common], cwd=node0, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (node0 / 'run' / 'checkpoint-last.pth').exists()
    t0 = time.monotonic()
    runs = _finish(_nodes([*common, '--resume', 'auto'], [node0, node1]), timeout=120)
    seconds = time.monotonic() - t0
    for rc, err in runs:
        assert rc != 0
        line = [x for x in err.splitlines() if 'm2d pretrain: error:' in x]
        assert line and 'rank 1 cannot read run/checkpoint-last.pth' in line[0], err[-3000:]
        assert 'the run folder must be on a filesystem every node sees' in line[0]
    assert seconds < 60, f'{seconds:.0f} s to stop'


RESUME_EVERYWHERE = """
from pathlib import Path
from m2d.train import distributed, state
from m2d.train.config import ConfigError

env = distributed.setup('cpu')
try:
    path, ckpt = state.open_resume_everywhere('auto', Path('run'), env)
    print('resumes', path, ckpt['step'])
except ConfigError as e:
    print('error:', e)
distributed.cleanup()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason='torch.distributed is not available')
def test_a_rank_with_another_copy_of_the_resume_file_stops_every_rank(tmp_path):
    """Each rank's own folder holds a 'run/checkpoint-last.pth': rank 1's copy is of another step."""
    port = _free_port()
    procs = []
    for rank, step in enumerate((6, 4)):
        (tmp_path / f'node{rank}' / 'run').mkdir(parents=True)
        torch.save({'model': {}, 'step': step}, tmp_path / f'node{rank}' / 'run' / 'checkpoint-last.pth')
        env = dict(ENV, RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, '-c', RESUME_EVERYWHERE], cwd=tmp_path / f'node{rank}', env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for out, err in outs:
        assert out.startswith('error: --resume auto: rank 1 cannot read run/checkpoint-last.pth that rank 0 resumes '
                              "from (step 4 in its copy, not rank 0's 6); the run folder must be on a filesystem "
                              'every node sees'), out + err[-2000:]


def test_default_run_folder_is_the_same_for_the_same_command():
    from m2d.train.config import TrainConfig

    base = dict(model='m2d_vit_tiny', input_size='80x208', csv_main='data/x.csv', epochs=10)
    name = TrainConfig(**base).default_run_name()
    assert name.startswith('m2d_vit_tiny-80x208p16x16p16k-') and name.endswith('-mr7')
    assert len(name.split('-')[2]) == 8
    # started again (with --resume auto, other workers, logging or devices) -> the same folder
    assert TrainConfig(**base, resume='auto', num_workers=2, log_every=5, device='cuda', save_every_minutes=5,
                       max_steps=3, eval_device='cpu').default_run_name() == name
    assert TrainConfig(**base).resolve_output_dir() == Path('runs') / name
    # what changes the weights changes the name
    for change in (dict(epochs=20), dict(seed=1), dict(lr=1e-3), dict(csv_main='data/y.csv'), dict(mask_ratio=0.6)):
        assert TrainConfig(**{**base, **change}).default_run_name() != name, change
    assert TrainConfig(**base, output_dir='mine/run1').resolve_output_dir() == Path('mine/run1')


def test_eval_device_keeps_training_gpus_free(monkeypatch):
    from m2d.train.config import ConfigError, TrainConfig
    from m2d.train.distributed import DistEnv
    from m2d.train.loop import eval_device

    assert TrainConfig().eval_device == 'auto'
    assert eval_device('auto', DistEnv()) == 'cpu'
    assert eval_device('cuda:0', DistEnv()) == 'cuda:0'
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    one_gpu = DistEnv(device=torch.device('cuda', 0))
    assert eval_device('auto', one_gpu) == 'cuda:1'
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert eval_device('auto', DistEnv(rank=0, world_size=8, device=torch.device('cuda', 0))) == 'cpu'
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    assert eval_device('auto', DistEnv(rank=0, world_size=4, device=torch.device('cuda', 0))) == 'cuda:2'
    with pytest.raises(ConfigError, match='--eval_device'):
        TrainConfig(eval_device='gpu7').check()


def test_wall_clock_checkpoints_and_the_same_command_continues_its_folder(lms_csv, tmp_path, monkeypatch):
    """--save_every_minutes writes checkpoint-last.pth mid-epoch once the time has passed (a fake clock
    here: 1 minute per step); 0 turns it off. Started again with --resume auto and other operational
    options, the same command finds its default run folder and continues it."""
    from m2d.train import state, train
    from m2d.train.config import TrainConfig

    clock = [0.0]
    monkeypatch.setattr(state.time, 'monotonic', lambda: clock[0])
    kw = dict(model='m2d_vit_tiny', depth=1, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2,
              input_size='80x96', min_ds_size=0, feature_eval_freq=0, csv_main=str(lms_csv), batch_size=4, epochs=2,
              save_freq=2, norm_stats='-2.2,4.7', num_workers=0, device='cpu', output_root=str(tmp_path / 'runs'))
    seen = {}

    def on_step(step):
        clock[0] += 60.0
        last = next((tmp_path / 'runs').glob('*/checkpoint-last.pth'), None)
        seen[step] = state.load(last)['step'] if last else None

    res = train(TrainConfig(**kw, save_every_minutes=2, max_steps=6), on_step=on_step)
    # 4 steps per epoch; the step-s check sees minute s-1: due at step 3 (mid-epoch), again at the end
    # of epoch 1 (after the hook of step 4: minute 4), then the --max_steps stop at step 6
    assert seen == {1: None, 2: None, 3: 3, 4: 3, 5: 4, 6: 6}
    seen.clear()
    again = train(TrainConfig(**kw, save_every_minutes=0, resume='auto', log_every=1), on_step=on_step)
    assert again.output_dir == res.output_dir and again.step == 8
    assert seen == {7: 6, 8: 6}  # the epoch checkpoint after the hook of step 8
    assert state.load(res.output_dir / 'checkpoint-last.pth')['step'] == 8
    # the cadence itself: 30 minutes by default, 0 never
    default, off = (state.Checkpointer(tmp_path, None, None, None, None, 1, 1, every_minutes=m)
                    for m in (TrainConfig().save_every_minutes, 0))
    clock[0] += 30 * 60 - 1
    assert not default.due() and not off.due()
    clock[0] += 1
    assert default.due() and not off.due()
    clock[0] += 1e9
    assert not off.due()
    assert [p.name for p in (tmp_path / 'runs').iterdir()] == [res.output_dir.name]


# Stands in for `m2d linear-eval`: the final evaluation (with baselines) of mode 'slow' announces itself in
# the file MARKER and sleeps; any other evaluation writes report.json at once
SLOW_EVAL = """
import json, pathlib, sys, time
mode, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == 'slow' and '--no_baselines' not in argv:
    pathlib.Path(marker).touch()
    time.sleep(120)
out = pathlib.Path(argv[argv.index('--output_dir') + 1])
out.mkdir(parents=True, exist_ok=True)
(out / 'report.json').write_text(json.dumps({'task': 't', 'metric': 'accuracy', 'model': {'mean': 0.5}}))
"""


def test_a_signal_during_the_final_evaluation_stops_it_and_resume_evaluates_again(lms_csv, tmp_path):
    import threading

    from m2d.train import train
    from m2d.train.config import TrainConfig

    script, marker = tmp_path / 'slow_eval.py', tmp_path / 'final-eval-started'
    script.write_text(SLOW_EVAL)
    kw = dict(model='m2d_vit_tiny', depth=1, decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2,
              input_size='80x96', min_ds_size=0, feature_eval_freq=0, csv_main=str(lms_csv), batch_size=8, epochs=1,
              norm_stats='-2.2,4.7', num_workers=0, device='cpu', output_dir=str(tmp_path / 'run'), eval=str(tmp_path))
    signalled_at = []

    def signal_when_the_final_evaluation_runs():
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        signalled_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=signal_when_the_final_evaluation_runs, daemon=True)
    watcher.start()
    res = train(TrainConfig(**kw), eval_command=[sys.executable, str(script), 'slow', str(marker)])
    watcher.join(5)
    assert marker.exists() and res.stopped_by == 'SIGTERM' and res.step == 2
    assert time.monotonic() - signalled_at[0] < 30  # not the evaluation's 120 s
    assert not (tmp_path / 'run' / 'eval_summary.json').exists()

    again = train(TrainConfig(**kw, resume='auto'), eval_command=[sys.executable, str(script), 'ok', str(marker)])
    assert again.stopped_by is None and again.step == 2
    assert (tmp_path / 'run' / 'eval_summary.json').is_file()
