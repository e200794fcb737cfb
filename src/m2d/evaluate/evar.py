"""EVAR's downstream tasks by name, and the seed README's published results table.

The facts of nttcslab/eval-audio-repr (``evar/ds_tasks.py``): each task's unit length (clips are
cropped from the start or zero-padded to it), its number of folds (us8k 10, esc50 5: every fold is
the test set in turn; the others have a split column) and its metric (accuracy, or mAP for the
multi-label fsd50k and as20k). ``nspitch``/``nsvelocity`` (NSynth pitch and velocity) and
``cremad_gender`` are derived from nsynth/cremad by ``m2d datasets`` and keep their parent's unit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvarTask:
    """One of EVAR's tasks: unit seconds, folds (1: a split column), metric."""

    name: str
    unit_sec: float
    folds: int = 1
    metric: str = 'accuracy'


EVAR_TASKS: dict[str, EvarTask] = {t.name: t for t in (
    EvarTask('esc50', 5.0, 5), EvarTask('us8k', 4.0, 10), EvarTask('spcv1', 1.0), EvarTask('spcv2', 1.0),
    EvarTask('vc1', 8.2), EvarTask('voxforge', 5.8), EvarTask('cremad', 2.5), EvarTask('gtzan', 30.0),
    EvarTask('nsynth', 4.0), EvarTask('surge', 4.0), EvarTask('fsd50k', 7.6358, metric='mAP'),
    EvarTask('as20k', 10.0, metric='mAP'), EvarTask('nspitch', 4.0), EvarTask('nsvelocity', 4.0),
    EvarTask('cremad_gender', 2.5),
    EvarTask('as', 10.0, metric='mAP'),  # AudioSet 2M: EVAR's metadata (evar/utils/make_as_metadata.py), for fine-tuning
)}

# The nine tasks of the results table in the seed README (section 4), in its order.
SEED_TABLE_TASKS = ('esc50', 'us8k', 'spcv2', 'vc1', 'voxforge', 'cremad', 'gtzan', 'nsynth', 'surge')

# The seed README's published rows for the three released weights (percent, as printed there).
PUBLISHED: dict[str, tuple[float, ...]] = {
    'msm_mae_vit_base-80x608p16x16-220924-mr75': (88.6, 86.3, 94.5, 72.2, 97.5, 70.2, 78.4, 75.9, 42.5),
    'm2d_vit_base-80x608p16x16-221006-mr6': (89.7, 87.6, 95.4, 73.1, 97.9, 71.7, 83.3, 75.3, 41.0),
    'm2d_vit_base-80x608p16x16-220930-mr7': (89.8, 87.1, 94.5, 71.3, 97.7, 71.6, 83.9, 76.9, 41.8),
}

# Zero-shot classification (`m2d zeroshot --suite evar`): the tasks of the M2D-CLAP paper's Table 5, in
# its order. The paper's AudioSet column is EVAR's task `as` (AudioSet's eval set as the test split);
# here that column is as20k, whose test split is the same eval set.
ZEROSHOT_TABLE_TASKS = ('as20k', 'fsd50k', 'esc50', 'us8k', 'cremad', 'gtzan', 'nsynth')

# Published zero-shot results (percent: mAP for as20k/fsd50k, accuracy otherwise) of M2D-CLAP/0.7, the
# released m2d_clap_vit_base-80x608p16x16-240128: Table 5 of D. Niizumi et al., "M2D-CLAP: Masked
# Modeling Duo Meets CLAP for Learning General-purpose Audio-Language Representation", Interspeech 2024
# (arXiv:2406.02032), shown as clap/image_Table5_CLAP_ZS.png in nttcslab/m2d's clap/README.md.
PUBLISHED_ZEROSHOT: dict[str, tuple[float, ...]] = {
    'm2d_clap_vit_base-80x608p16x16-240128': (27.24, 40.82, 75.45, 72.40, 17.73, 75.17, 23.39),
}
