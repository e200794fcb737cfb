"""`m2d superb report`: the test scores s3prl writes, read back into one table."""

import pytest

from m2d.cli import main
from m2d.superb import SuperbError
from m2d.superb.report import phone_error_rate, read_result

BASE = 'm2d_s_vit_base-80x608p80x2-230220-checkpoint-1000'


def experiment(root, name, log=None, arks=None):
    d = root / name
    d.mkdir(parents=True)
    if log is not None:
        (d / 'log.log').write_text(log)
    for split_name, text in (arks or {}).items():
        (d / split_name).write_text(text)
    return d


@pytest.fixture
def results(tmp_path):
    root = tmp_path / 'result' / 'downstream'
    experiment(root, f'{BASE}-KS-lr1e-4-s7', 'dev at step 4000: 0.95\nNew best on dev at step 4000: 0.95\n'
               'test at step 4000: 0.961\ntest at step 0: 0.9712\n')
    # No evaluate step yet: the test score at the step of the best dev score.
    experiment(root, f'{BASE}-IC-lr1e-3-s7', 'New best on dev at step 4000: 0.98\ntest at step 4000: 0.97\n'
               'New best on dev at step 8000: 0.99\ntest at step 8000: 0.985\ntest at step 12000: 0.99\n')
    for fold, acc in (('fold1', 0.70), ('fold2', 0.66)):
        experiment(root, f'{BASE}-ER-lr1e-5-s7-{fold}', f'test at step 0: {acc}\n')
    experiment(root, f'{BASE}-PR-lr1e-3-s7', arks={
        'test-ref.ark': 'u1 a b c d\nu2 e f\n', 'test-hyp.ark': 'u2 e f\nu1 a x c\n'})
    return root


def test_read_results(results):
    ks = read_result(results / f'{BASE}-KS-lr1e-4-s7')
    assert ks.task.name == 'KS' and ks.value == pytest.approx(97.12) and 'evaluate' in ks.source
    ic = read_result(results / f'{BASE}-IC-lr1e-3-s7')
    assert ic.value == pytest.approx(98.5) and 'best dev step 8000' in ic.source
    pr = read_result(results / f'{BASE}-PR-lr1e-3-s7')
    assert pr.task.metric == 'per' and pr.value == pytest.approx(100 * 2 / 6)  # 1 substitution + 1 deletion
    assert read_result(results / f'{BASE}-ER-lr1e-5-s7-fold2').fold == 'fold2'


def test_report_table(results, capsys):
    assert main(['superb', 'report', str(results)]) == 0  # the folder holding the experiments
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[:3] for line in lines[1:7]]
    assert rows == [['PR', 'PER', '(%)'], ['KS', 'acc', '(%)'], ['IC', 'acc', '(%)'], ['ER', 'acc', '(%)'],
                    ['ER', 'acc', '(%)'], ['ER', 'acc', '(%)']]
    assert lines[1].split()[3] == '33.33' and lines[2].split()[3] == '97.12'
    assert 'mean of 2 (fold1, fold2)' in lines[6] and lines[6].split()[3] == '68.00'
    assert lines[-2].split() == ['model', 'PR', '(PER)', 'KS', '(acc)', 'IC', '(acc)', 'SID', '(acc)', 'ER', '(acc)']
    assert lines[-1].split() == [BASE, '33.33', '97.12', '98.50', '-', '68.00']


def test_report_keeps_models_apart(results, capsys):
    experiment(results, 'other_model-checkpoint-5-KS-lr1e-4-s7', 'test at step 0: 0.5\n')
    assert main(['superb', 'report', str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].split()[:3] == [BASE, '33.33', '97.12']
    assert lines[-1].split() == ['other_model-checkpoint-5', '-', '50.00', '-', '-', '-']


def test_report_errors(tmp_path, capsys):
    root = tmp_path / 'r'
    sid = experiment(root, f'{BASE}-SID-lr1e-3-s7', 'dev at step 500: 0.5\n')
    with pytest.raises(SuperbError, match='no test result yet'):
        read_result(sid)
    pr = experiment(root, f'{BASE}-PR-lr1e-3-s7')
    with pytest.raises(SuperbError, match='test-hyp.ark'):
        read_result(pr)
    with pytest.raises(SuperbError, match='cannot tell the task'):
        read_result(experiment(root, 'something'))
    assert main(['superb', 'report', str(sid)]) == 2
    err = capsys.readouterr().err
    assert 'no test result yet' in err and err.count('\n') == 1


def test_task_from_s3prl_args_file(tmp_path):
    d = experiment(tmp_path, 'my_run', 'test at step 0: 0.5\n')
    (d / 'args_2024-01-01-00-00-00.yaml').write_text('downstream: voxceleb1\nexpname: my_run\n')
    assert read_result(d).task.name == 'SID'


def test_per_as_s3prl(tmp_path):
    """With s3prl (and editdistance) importable: the same PER as s3prl's metric."""
    metric = pytest.importorskip('s3prl.downstream.ctc.metric')
    hyp, ref = ['a x c', 'e f', ''], ['a b c d', 'e f', 'g']
    (tmp_path / 'h.ark').write_text(''.join(f'u{i} {h}\n' for i, h in enumerate(hyp)))
    (tmp_path / 'r.ark').write_text(''.join(f'u{i} {r}\n' for i, r in enumerate(ref)))
    assert phone_error_rate(tmp_path / 'h.ark', tmp_path / 'r.ark') == pytest.approx(metric.per(hyp, ref))
