"""Fine-tuning an M2D encoder with EVAR's classification head on a labeled audio task.

The protocol of EVAR's ``finetune.py`` with ``config/m2d.yaml`` (METHOD.md, "Downstream protocol"),
audited line by line against ``run_eval``, ``_train``, ``TaskHead``, ``AudioFineuneAug`` and the losses:

- folds (``run_eval``): a fold task (CSV with ``fold``, no ``split``: ESC-50's 5, US8K's 10) runs
  every fold as the test set in turn, the others training, each with a fresh model; the score is
  the mean over folds. ``fold`` runs one fold. Module `run`.
- validation: the task's valid split. Without one (every fold task) EVAR validates on the test
  split and reports the best epoch's test score; the same by default, flagged in the report as
  optimistic; ``valid_fraction`` carves a stratified part of train instead. Module `data`.
- model: waveform -> log-mel -> normalized with the weight file's statistics (EVAR's ``get_backbone``
  writes them over the yaml's -7.1/4.2; ``norm_stats='auto'`` computes them on the train split) ->
  [train: SpecAugment, then random resize crop: ``AudioFineuneAug``] -> encoder (train: with a
  structured patch mask when ``training_mask > 0``, keeping the patches the reference's runtime
  keeps: `masking.keep_selected`) -> mean over time -> ``TaskHead``:
  ``BatchNorm1d(D, affine=False)`` -> ``Linear(D, C)`` (N(0, 0.01), bias 0). Features are flat
  (``D``) when ``training_mask > 0``, stacked (``Fp*D``) otherwise; at evaluation the encoder is
  exactly `RuntimeM2D.encode`. Module `model`.
- data: train clips cropped at a random start in ``[0, len - unit)`` (short ones zero-padded),
  test clips from the start; mixup on waveforms and one-hot targets (``λ ~ Beta(α, α)`` per sample,
  partner = a random permutation of the batch). Batch 128 (``ft_bs``), a short last batch kept.
- loss: ``-mean(y * log_softmax(logits))`` (soft-target cross-entropy divided by the number of
  classes, so EVAR's learning rates carry over), BCE with logits for multi-label. Module `scoring`.
- optimizer: SGD (momentum 0.9, no weight decay), AdamW (β 0.9/0.95, eps 1e-8, weight decay 1e-4,
  amsgrad) or timm's Lars (momentum 0.9, no weight decay: then momentum SGD); the rate of timm's
  ``CosineLRScheduler(t_initial=epochs, lr_min=1e-7, warmup_t=5, warmup_lr_init=0)``, set per
  micro-epoch *after* each step as ``_train`` does, so step k runs at the schedule's value at
  ``(k-1)/steps_per_epoch``. Module `optim`.
- selection: the validation metric (accuracy, or mAP) after every epoch; a strictly better score is
  the new best (ties keep the earlier epoch); the best weights are tested. No early stopping by
  default (``ft_early_stop_epochs: -1``); ``patience`` P stops as EVAR's ``early_stop_epochs`` P-1.
  Module `loop`.
- defaults (``config/m2d.yaml``): lr 2.0, batch 128, 200 epochs, warmup 5, mixup 0.5, freq/time
  mask 30/192, rrc on, training mask 0, no early stop. `FinetuneSettings`.
- the reference's runtime options: ``dur_frames`` (the encoder takes N frames: ``pos_embed`` trimmed
  or bicubically resampled, inputs cropped/padded to N) and ``freeze_embed`` (`model`);
  ``encoder_only`` is what our loader always does (only the encoder's weights are loaded).
- recipes: the reference's ``util/ft-*.sh`` by name (`recipes`), incl. AS2M's weighted epochs of
  200,000 clips (`data.audioset_sample_weights`, `data.WeightedEpochSampler`) over log-mel .npy
  clips; clip names and labels live in numpy buffers (`data.ClipData`), not per-clip objects.

Differences from EVAR, on purpose:

- the best weights are kept in memory and written every ``save_every`` epochs and at the end (EVAR
  writes a file on each improving epoch; ~350 MB for ViT-Base); atomically, in our file format.
- each fold is seeded afresh with the seed (EVAR seeds once before its fold loop), so ``fold=K``
  reproduces fold K of a full run; EVAR's default seed is 42, ours 0 (the seed README's command
  lines all pass ``--seed 0``).
- when validating on test, the test score is the best epoch's validation pass (as EVAR reports);
  otherwise the best weights are tested, as EVAR does.
- SpecAugment bands are drawn per sample (torchaudio's maskings in EVAR draw one band per batch).
- valid clips are cropped from the start (EVAR crops its valid split at random, its test split from
  the start).
- the first epoch's score is always a first best (EVAR starts from 0.0 and never saves an epoch
  that scores 0); a last training batch of one clip is dropped (BatchNorm cannot train on it).
- class ids come from all the task's clips (EVAR's from the train split's labels: the same when
  every class has train clips).
- extras EVAR's finetune.py has not: ``bf16``, ``patience``, ``valid_fraction``, ``weight_decay``;
  EVAR's ``hidden`` head layers and ``lamb`` optimizer are not here; its balanced sampling is here
  only as the 'as' task's weighted epochs (``weighted_sampling``).

The checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``: EVAR's keys
``module.ar.runtime.backbone.*``, ``module.head.norm.running_mean/var``,
``module.head.mlp.mlp.0.weight/bias``, plus ``norm_stats`` (tensor [2], read by the reference's
portable runtime too), ``classes`` (list of str), ``m2d_name`` (geometry and sample rate, e.g.
``m2d_vit_base-80x608p16x16p16k``) and ``m2d_finetune`` (a JSON string: task, metric, multilabel,
epoch, unit_sec). It loads in ``RuntimeM2D(path, num_classes=C)``; its folder is named
``<m2d_name>-<task>`` so the reference's loaders, which parse the folder name, load it too.

Modules: `settings` (options), `recipes`, `model`, `data`, `optim`, `scoring`, `loop` (epochs), `files` (the
checkpoint, best weights), `report`, `run` (`finetune`, the fold loop).
"""

from __future__ import annotations

from .data import CACHE_BYTES, ClipData, Splits, WeightedEpochSampler, audioset_sample_weights, choose_splits
from .files import (CHECKPOINT_FILE, BestWeights, checkpoint_path, default_output_dir, finetuned_state, model_name,
                    state_file)
from .loop import fit, predict_logits, train_epoch
from .model import EvarHead, FinetuneModel, checkpoint_for_frames, fit_frames
from .optim import LARS, learning_rate, make_optimizer, step_learning_rate
from .recipes import RECIPES, Recipe, apply_recipe, evar_command_line, get_recipe
from .report import CONFUSION_PNG, CURVES_PNG, REPORT_JSON, REPORT_MD, plot_confusion, plot_curves, write_report
from .run import finetune, run_one
from .scoring import class_accuracy, evaluate_scores, evar_loss
from .settings import OPTIMIZERS, FinetuneError, FinetuneSettings, parse_norm_stats
from ...checkpoint import save_checkpoint

__all__ = ['BestWeights', 'CACHE_BYTES', 'CHECKPOINT_FILE', 'CONFUSION_PNG', 'CURVES_PNG', 'ClipData', 'EvarHead',
           'FinetuneError', 'FinetuneModel', 'FinetuneSettings', 'LARS', 'OPTIMIZERS', 'RECIPES', 'REPORT_JSON',
           'REPORT_MD', 'Recipe', 'Splits', 'WeightedEpochSampler', 'apply_recipe', 'audioset_sample_weights',
           'checkpoint_for_frames', 'checkpoint_path', 'choose_splits', 'class_accuracy', 'default_output_dir',
           'evaluate_scores', 'evar_command_line', 'evar_loss', 'finetune', 'finetuned_state', 'fit', 'fit_frames',
           'get_recipe', 'learning_rate', 'make_optimizer', 'model_name', 'parse_norm_stats', 'plot_confusion',
           'plot_curves', 'predict_logits', 'run_one', 'save_checkpoint', 'state_file', 'step_learning_rate',
           'train_epoch', 'write_report']
