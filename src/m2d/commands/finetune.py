"""`m2d finetune --weights W (--task NAME | --csv FILE) --data_dir DIR`: fine-tune with EVAR's head."""

from __future__ import annotations

import argparse


EPILOG = """\
The encoder and a BatchNorm + Linear head are trained end to end as EVAR's finetune.py does (SGD,
warmup + cosine, mixup, random resize crop, SpecAugment, optional structured patch masking); the
best-validation checkpoint is tested and saved as OUTPUT_DIR/<model>-<task>/weights_best.pth, which
`m2d predict`, RuntimeM2D(path, num_classes=C) and the reference's runtimes load. Reports:
OUTPUT_DIR/report.json, report.md, learning_curves.png (default OUTPUT_DIR: eval/<weights>/<task>/finetune).
A fold task (ESC-50, US8K) runs every fold (OUTPUT_DIR/fold<K>/) and reports their mean. A task
without a valid split is validated on its test split, as EVAR does (an optimistic number; the report
says so), unless --valid_fraction F is given.

examples:
  m2d finetune --weights m2d_vit_base-80x608p16x16-221006-mr7 --task fsdd-digits --data_dir data/fsdd \\
      --epochs 20 --lr 0.5 --batch_size 32
  # EVAR: python finetune.py config/m2d.yaml esc50 weight_file=W --lr 0.5 --freq_mask 0 --time_mask 0
  #       --training_mask 0.5 --mixup 0.0 --rrc True --seed 0
  m2d finetune --weights W --task esc50 --csv evar/metadata/esc50.csv --data_dir work/16k/esc50 \\
      --lr 0.5 --freq_mask 0 --time_mask 0 --training_mask 0.5 --mixup 0.0 --rrc True --seed 0  # all 5 folds
  m2d finetune --weights W --task vc1 --csv vc1.csv --data_dir work/16k/vc1 --optim adamw --lr 0.001 \\
      --freq_mask 0 --time_mask 0 --training_mask 0.0 --mixup 0.0 --rrc False --seed 0
"""

TRUE, FALSE = ('true', '1', 'yes', 'on'), ('false', '0', 'no', 'off')


def boolean(value: str) -> bool:
    """``True``/``False`` (EVAR's ``--rrc True``), also 1/0, yes/no, on/off."""
    v = str(value).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {value!r}')


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """Task selection, as `m2d linear-eval`: --task NAME --data_dir DIR | --csv FILE --data_dir DIR | --data_dir DIR."""
    g = parser.add_argument_group('task')
    g.add_argument('--task', default=None, metavar='NAME',
                   help="one of EVAR's tasks (esc50, us8k, ..., with EVAR's unit length; read from DATA_DIR/NAME.csv "
                        'or --csv) or a built-in one (fsdd-digits, fsdd-speakers)')
    g.add_argument('--csv', default=None, metavar='FILE',
                   help='task CSV with columns file_name,label[,split] (EVAR metadata files work as they are)')
    g.add_argument('--data_dir', '--data-dir', dest='data_dir', default=None, metavar='DIR',
                   help='audio folder: the CSV file names are relative to it; alone, its sub-folders are the classes')
    g.add_argument('--unit_sec', '--unit-sec', dest='unit_sec', type=float, default=None, metavar='S',
                   help="clip length in seconds (crop/zero-pad); default EVAR's unit for its tasks, else the longest "
                        'clip, at most 10 s')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluate.finetune.recipes import RECIPES

    d = _defaults()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG + RECIPES_HELP.format(recipes='\n'.join(
        f'  {r.name:<7} {r.script:<17} {_recipe_summary(r)}' for r in RECIPES.values()))
    parser.add_argument('--weights', '-w', required=True, metavar='NAME_OR_PATH',
                        help='a released model name or a weight file (.pth, .safetensors, an m2d pretrain checkpoint); '
                             'only its encoder is used (the reference\'s encoder_only=True, always)')
    parser.add_argument('--recipe', default=None, choices=list(RECIPES), metavar='NAME',
                        help=f'the settings of one of the reference\'s scripts ({", ".join(RECIPES)}; see below); '
                             'options given beside it override it; --task defaults to its task')
    add_task_arguments(parser)
    parser.add_argument('--data_path', '--data-path', dest='data_path', default=None, metavar='DIR',
                        help="read the CSV's clips as log-mel .npy files (name.wav -> name.npy) from DIR, as EVAR's "
                             "'as' task with --data_path (the reference's data/audioset_lms); instead of --data_dir")
    o = parser.add_argument_group('training (defaults: EVAR config/m2d.yaml, or the recipe\'s)')
    o.add_argument('--lr', type=float, default=None, help=f'peak learning rate (default {d.lr})')
    o.add_argument('--optim', choices=['sgd', 'adamw', 'lars'], default=None,
                   help="optimizer, as EVAR builds them: sgd (momentum 0.9), adamw, lars (timm's Lars, momentum 0.9: "
                        'with no weight decay plain momentum SGD) (default sgd)')
    o.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=None,
                   help=f'clips per step (default {d.batch_size})')
    o.add_argument('--epochs', type=int, default=None, help=f'training epochs (default {d.epochs})')
    o.add_argument('--warmup_epochs', '--warmup-epochs', dest='warmup_epochs', type=float, default=None,
                   help=f'linear warmup epochs before the cosine decay (default {d.warmup_epochs:g})')
    o.add_argument('--patience', type=int, default=None,
                   help='stop after N epochs without a better validation score (default 0: train every epoch, '
                        'keep the best, as EVAR; its --early_stop_epochs N is --patience N+1)')
    o.add_argument('--mixup', type=float, default=None, metavar='ALPHA',
                   help=f'mixup Beta α; 0 disables (default {d.mixup})')
    o.add_argument('--rrc', type=boolean, nargs='?', const=True, default=None, metavar='True|False',
                   help='random resize crop of the log-mel input (default True)')
    o.add_argument('--freq_mask', '--freq-mask', dest='freq_mask', type=int, default=None,
                   help=f'SpecAugment frequency band, up to N mel bins; 0 disables (default {d.freq_mask})')
    o.add_argument('--time_mask', '--time-mask', dest='time_mask', type=int, default=None,
                   help=f'SpecAugment time band, up to N frames; 0 disables (default {d.time_mask})')
    o.add_argument('--training_mask', '--training-mask', dest='training_mask', type=float, default=None,
                   help='structured patch mask ratio while training, the patches kept as the reference\'s runtime '
                        'keeps them; > 0 also makes the features flat (D per patch) (default 0.0)')
    o.add_argument('--dur_frames', '--dur-frames', dest='dur_frames', type=int, default=None, metavar='N',
                   help="the reference's dur_frames: the encoder takes N frames (e.g. 1001 for 10 s), its pos_embed "
                        'trimmed (shorter) or bicubically resampled (longer), every input cropped/padded to N '
                        'frames; the fine-tuned file is named for N (default: the model\'s own length, in chunks)')
    o.add_argument('--freeze_embed', '--freeze-embed', dest='freeze_embed', type=boolean, nargs='?', const=True,
                   default=None, metavar='True|False',
                   help="the reference's freeze_embed: the patch embedding is not trained (default False)")
    o.add_argument('--weighted_sampling', '--weighted-sampling', dest='weighted_sampling', type=int, default=None,
                   metavar='N', help="an epoch is N train clips drawn without replacement, weighted by AudioSet's "
                                     "label-frequency formula (EVAR's 'as' task: 200000) (default 0: every clip once)")
    o.add_argument('--weight_decay', '--weight-decay', dest='weight_decay', type=float, default=None,
                   help='default 0 (sgd, lars) or 1e-4 (adamw), as EVAR')
    o.add_argument('--norm_stats', '--norm-stats', dest='norm_stats', default=None, metavar='auto|MEAN,STD',
                   help="log-mel normalization: default the weight file's (EVAR uses them for M2D); auto = computed "
                        'on the train split (what EVAR does only for models without statistics)')
    o.add_argument('--seed', type=int, default=None,
                   help='seed of the split, order, augmentations, head init (default 0; EVAR\'s is 42)')
    o.add_argument('--fold', default=None, metavar='K',
                   help='a fold task (CSV with a fold column): run only fold K as the test set (default: every '
                        'fold in turn, the score is their mean, as EVAR)')
    o.add_argument('--valid_fraction', '--valid-fraction', dest='valid_fraction', type=float, default=None,
                   metavar='F', help='for a task without a valid split: validate on a stratified fraction F of train '
                                     '(default: on the test split, as EVAR; the report flags it as optimistic)')
    r = parser.add_argument_group('run')
    r.add_argument('--output_dir', '--output-dir', dest='output_dir', default=None, metavar='DIR',
                   help='where the reports and the checkpoint go (default eval/<weights>/<task>/finetune)')
    r.add_argument('--save_every', '--save-every', dest='save_every', type=int, default=10, metavar='N',
                   help='write the best weights (kept in memory) every N epochs if they changed, and at the end; '
                        '0: only at the end (default %(default)s)')
    r.add_argument('--device', default=None, help='torch device (default cuda if available, else cpu)')
    r.add_argument('--bf16', action='store_true', help='bfloat16 autocast for the encoder (GPUs, recent CPUs)')
    r.add_argument('--workers', type=int, default=0,
                   help='DataLoader processes reading audio; 0 reads each clip once and keeps it in memory (default)')
    r.add_argument('--trust', action='store_true', help='allow weight files that need code to unpickle')
    r.add_argument('--quiet', '-q', action='store_true', help='no progress bars')


RECIPES_HELP = """
recipes (--recipe NAME: the settings of nttcslab/m2d's util/ft-*.sh, run in EVAR with finetune.py;
options given beside --recipe override it; the report prints the reference's equivalent command):
{recipes}
examples with a recipe:
  m2d finetune --recipe esc50 --weights W --data_dir work/16k/esc50 --seed 43
  m2d finetune --recipe as2m --weights W --csv evar/metadata/as.csv --data_path data/audioset_lms
"""

# Settings taken from the command line when given (None: the recipe's or the default).
SETTING_OPTIONS = ('lr', 'optim', 'batch_size', 'epochs', 'warmup_epochs', 'patience', 'mixup', 'rrc', 'freq_mask',
                   'time_mask', 'training_mask', 'dur_frames', 'freeze_embed', 'weighted_sampling', 'weight_decay',
                   'norm_stats', 'seed', 'fold', 'valid_fraction')


def _defaults():
    from ..evaluate.finetune.settings import FinetuneSettings

    return FinetuneSettings()


def _recipe_summary(r) -> str:
    s = r.settings
    extra = [f'dur_frames={s["dur_frames"]}'] if 'dur_frames' in s else []
    extra += ['freeze_embed'] if s.get('freeze_embed') else []
    extra += [f'{s["weighted_sampling"]} weighted clips/epoch'] if s.get('weighted_sampling') else []
    return (f'task {r.task}: {s["optim"]} lr {s["lr"]:g}, batch {s["batch_size"]}, {s["epochs"]} ep '
            f'(warmup {s["warmup_epochs"]:g}), mask {s["freq_mask"]}/{s["time_mask"]}, '
            f'training_mask {s["training_mask"]:g}, mixup {s["mixup"]:g}, rrc {s["rrc"]}'
            + (', ' + ', '.join(extra) if extra else ''))


def settings_from_args(args: argparse.Namespace):
    """`FinetuneSettings`: the recipe's (if any), then every option given on the command line."""
    from ..evaluate.finetune.recipes import apply_recipe

    explicit = {k: getattr(args, k) for k in SETTING_OPTIONS if getattr(args, k) is not None}
    explicit.update(save_every=args.save_every, bf16=args.bf16, device=args.device, workers=args.workers,
                    trust=args.trust, progress=not args.quiet, data_path=args.data_path)
    return apply_recipe(args.recipe, explicit)


def run(args: argparse.Namespace) -> int:
    from .. import hub
    from ..evaluate.finetune import FinetuneError, finetune
    from ..evaluate.finetune.recipes import get_recipe
    from ..evaluate.tasks import load_task

    settings = settings_from_args(args)
    settings.check()  # option errors before the data is read
    task_name = args.task if args.task is not None else get_recipe(args.recipe).task if args.recipe else None
    if args.data_path is not None and args.data_dir is not None:
        raise FinetuneError(f'--data_path {args.data_path} and --data_dir {args.data_dir}: give one of them '
                            '(--data_path reads log-mel .npy clips, --data_dir audio files)')
    task = load_task(task_name, csv=args.csv, data_dir=args.data_path or args.data_dir, unit_sec=args.unit_sec,
                     seed=settings.seed, require_valid=False, file_suffix='.npy' if args.data_path else None)
    report = finetune(hub.weights_path(args.weights), task, args.output_dir, settings)
    if report.get('recipe'):
        print(f'recipe {report["recipe"]["name"]} ({report["recipe"]["script"]}); the reference: '
              f'{report["reference_command"]}')
    where = 'validated on test: optimistic' if report['validation']['split'] == 'test' else 'validated on ' + (
        'a carved part of train' if report['validation']['split'] == 'carved' else 'the valid split')
    if 'fold_runs' in report:
        folds = ', '.join(f'{f["fold"]}: {f["test"]:.4f}' for f in report['fold_runs'])
        print(f'{task.name}: test {report["metric"]} {report["test"]:.4f}, the mean over folds ({folds}; {where}); '
              f'report {report["output_dir"]}/report.md')
    else:
        print(f'{task.name}: test {report["metric"]} {report["test"]:.4f} (best valid {report["valid_best"]:.4f} at '
              f'epoch {report["best_epoch"]}; {where}); checkpoint {report["checkpoint"]}; '
              f'report {report["output_dir"]}/report.md')
    return 0
