"""`m2d predict FILES... --weights FT_FILE [--top K] [--json] [--timeline ...]`: labels of audio files;
`--weights CLAP_FILE --labels "dog,rain"`: zero-shot classification with M2D-CLAP."""

from __future__ import annotations

import argparse

from . import CommandError

MAX_EVENTS_SHOWN = 40  # events printed per file; all of them are in NAME.events.csv

EPILOG = """\
FT_FILE is a fine-tuned weight file, or the name of a released fine-tuned model (downloaded once
to the cache, as `m2d encode` does): m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly (16 kHz),
m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly (32 kHz). Labels: the names a file made by
`m2d finetune` stores (sigmoid for a multi-label task, softmax otherwise); AudioSet's 527 names,
multi-label, for an EVAR head of 527 classes (the AS-FT releases); class indices such as #3 for
other EVAR files (add --multilabel for a multi-label task). Clip mode crops/zero-pads each file to
the fine-tuning length (--unit_sec 0: the whole file).

--timeline reads each file as a stream (any length, bounded memory), scores windows of the model's
input length every --hop seconds, and writes into --out: NAME.windows.csv (start,end,label,p: the
top K labels per window), NAME.events.csv (start,end,label,peak_p: a label above --threshold over
consecutive windows) and, with --plot, NAME.timeline.png. It prints the events (or, with --json,
windows and events as JSON).

Zero-shot (M2D-CLAP): --weights CLAP_FILE with --labels "dog barking,rain,siren" (or --labels_file,
one label a line). Each label becomes a caption (--template, default "{label} can be heard", _ made a
space, as the reference's ESC-50 notebook) embedded by the CLAP text encoder the file's name says
(GTE base for the 2024 release; --text_encoder NAME_OR_DIR to use another, e.g. a local folder; needs
pip install 'm2d[clap]'). For each label: similarity = cosine of the CLAP audio and text embeddings,
probability = softmax over the labels of exp(logit_scale) x cosine. Labels are listed most similar
first, all of them unless --top is given. Clips are scored whole (--unit_sec to crop/pad); with
--timeline, every window of the model's input length, and --threshold applies to the probability.

examples:
  m2d predict clip.wav --weights m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly
  m2d predict clips/ --weights m2d_clap_vit_base-80x608p16x16-240128 --labels "dog barking,rain,siren"
  m2d predict street.wav --weights m2d_clap_vit_base-80x608p16x16-240128 --labels_file labels.txt --timeline
  m2d predict meeting.wav --weights m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly --timeline --plot
  m2d predict clips/*.wav --weights eval/.../weights_best.pth --top 3 --json > predictions.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('files', nargs='+', metavar='FILE', help='audio files (folders are searched recursively)')
    parser.add_argument('--weights', '-w', required=True, metavar='FT_FILE',
                        help='a fine-tuned weight file, or a released fine-tuned model name (with --labels: an '
                             'M2D-CLAP file or name)')
    parser.add_argument('--top', type=int, default=None, metavar='K',
                        help='labels shown per file or window (default 5; zero-shot: all labels)')
    parser.add_argument('--labels', default=None, metavar='"A,B,..."',
                        help='zero-shot with an M2D-CLAP file: the labels, comma-separated')
    parser.add_argument('--labels_file', '--labels-file', dest='labels_file', default=None, metavar='FILE',
                        help='zero-shot: a text file of labels, one a line')
    parser.add_argument('--template', default=None, metavar='TEXT',
                        help='zero-shot: the caption of a label (default "{label} can be heard")')
    parser.add_argument('--text_encoder', '--text-encoder', dest='text_encoder', default=None, metavar='NAME_OR_DIR',
                        help="zero-shot: the CLAP text encoder instead of the one the file's name says: A (GTE base), "
                             'B (BERT base), N (NV-Embed-v2), a Hugging Face name or a local folder')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    parser.add_argument('--unit_sec', '--unit-sec', dest='unit_sec', type=float, default=None, metavar='S',
                        help='clip mode: crop/pad each file to S seconds (default: the fine-tuning length; 0: whole file)')
    parser.add_argument('--multilabel', action='store_true',
                        help='sigmoid probabilities (for EVAR files of multi-label tasks, which do not say)')
    parser.add_argument('--timeline', action='store_true', help='score the whole recording in sliding windows')
    parser.add_argument('--hop', type=float, default=None, metavar='S',
                        help='timeline: seconds between window starts (default: half a window)')
    parser.add_argument('--threshold', type=float, default=0.5, metavar='P',
                        help='timeline: probability above which a label makes an event (default %(default)s)')
    parser.add_argument('--plot', action='store_true', help='timeline: also draw NAME.timeline.png (needs matplotlib)')
    parser.add_argument('--out', '-o', default='.', metavar='DIR', help='timeline: folder of the outputs (default: .)')
    parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=8, metavar='N',
                        help='timeline: windows scored together (default %(default)s)')
    parser.add_argument('--bf16', action='store_true', help='run the encoder in bfloat16 (CPUs with AVX512-BF16/AMX, GPUs)')
    parser.add_argument('--device', default=None, help='torch device (default cuda if available, else cpu)')
    parser.add_argument('--trust', action='store_true', help='allow weight files that need code to unpickle')


def _files(args: argparse.Namespace) -> list:
    from pathlib import Path

    from ..audio import find_audio_files

    files = []
    for f in args.files:
        p = Path(f)
        if p.is_dir():
            found = find_audio_files(p)
            if not found:
                raise CommandError(f'{p}: no audio files in this folder')
            files += found
        elif not p.is_file() and len(args.files) == 1:
            raise CommandError(f'{p}: no such file')
        else:
            files.append(p)  # a missing one among several is reported with the other failures
    return files


def _check(args: argparse.Namespace) -> None:
    zero_shot = args.labels is not None or args.labels_file is not None
    for name in ('template', 'text_encoder'):
        if getattr(args, name) is not None and not zero_shot:
            raise CommandError(f'--{name}: needs --labels or --labels_file (zero-shot with an M2D-CLAP file)')
    if zero_shot and args.multilabel:
        raise CommandError('--multilabel: not for zero-shot (the probabilities are a softmax over the labels)')
    if args.top is not None and args.top < 1:
        raise CommandError(f'--top {args.top}: must be at least 1')
    if args.unit_sec is not None and args.unit_sec < 0:
        raise CommandError(f'--unit_sec {args.unit_sec}: must be >= 0')
    if args.hop is not None and not args.hop > 0:
        raise CommandError(f'--hop {args.hop:g}: must be positive')
    if not 0 < args.threshold < 1:
        raise CommandError(f'--threshold {args.threshold:g}: must be between 0 and 1 (exclusive)')
    if args.batch_size < 1:
        raise CommandError(f'--batch_size {args.batch_size}: must be at least 1')
    if args.plot and not args.timeline:
        raise CommandError('--plot: needs --timeline')
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError('--plot: needs matplotlib, which is not installed (pip install matplotlib)') from None


def _report_failures(failures: list[str], total: int) -> int:
    import sys

    if not failures:
        return 0
    if total == 1:
        raise CommandError(failures[0])
    print(f'm2d predict: {len(failures)} of {total} files failed:', file=sys.stderr)
    for line in failures:
        print(f'  {line}', file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    import json

    from ..evaluate.predict import load_classifier, load_zero_shot, predict_files, read_labels
    from ..runtime import resolve_device

    _check(args)
    files = _files(args)
    device = resolve_device(args.device)
    if args.labels is not None or args.labels_file is not None:
        clf = load_zero_shot(args.weights, read_labels(args.labels, args.labels_file), args.template,
                             args.text_encoder, trust=args.trust, bf16=args.bf16, device=device)
        args.top = args.top or clf.num_classes
    else:
        clf = load_classifier(args.weights, multilabel=True if args.multilabel else None, trust=args.trust,
                              bf16=args.bf16)
        args.top = args.top or 5
    if args.timeline:
        return _run_timeline(args, clf, files, device)
    results, failures = predict_files(clf, files, top=args.top, unit_sec=args.unit_sec, device=device)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r['file'] + '\t' + '  '.join(_entry(t) for t in r['top']))
    return _report_failures(failures, len(files))


def _entry(t: dict) -> str:
    """``label 0.912`` (zero-shot: ``label 0.912 (cos 0.314)``)."""
    text = f'{t["label"]} {t["probability"]:.3f}'
    return text + f' (cos {t["similarity"]:.3f})' if 'similarity' in t else text


def _write_csv(path, header: list[str], rows: list) -> None:
    import csv

    from ..fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _run_timeline(args: argparse.Namespace, clf, files: list, device) -> int:
    import json
    from pathlib import Path

    from ..audio import AudioError
    from ..evaluate.timeline import events, logmel_overview, plot_timeline, timeline_file

    sr = clf.runtime.sample_rate
    window = clf.window_samples
    hop = args.hop if args.hop is not None else window / sr / 2
    if hop > window / sr:
        raise CommandError(f'--hop {hop:g}: must be at most the window of this model ({window / sr:g} s)')
    out = Path(args.out)
    results, failures = [], []
    for f in files:
        try:
            track = timeline_file(clf, f, hop_sec=hop, batch_size=args.batch_size, device=device)
        except AudioError as e:
            failures.append(str(e))
            continue
        found = events(track, args.threshold)
        windows = track.top(args.top)
        stem = Path(f).stem
        columns = ['start', 'end', 'label'] + (['similarity'] if track.similarity is not None else []) + ['p']
        _write_csv(out / f'{stem}.windows.csv', columns, [[w[c] for c in columns] for w in windows])
        _write_csv(out / f'{stem}.events.csv', ['start', 'end', 'label', 'peak_p'], [list(e) for e in found])
        written = [out / f'{stem}.windows.csv', out / f'{stem}.events.csv']
        if args.plot:
            from ..audio import LogMelSpectrogram, preset, stream_audio
            lms = logmel_overview(stream_audio(f, sr, block_samples=60 * sr), LogMelSpectrogram(preset(sr)),
                                  int(round(track.duration * sr)))
            what = 'labels (zero-shot)' if track.similarity is not None else 'classes'
            written.append(plot_timeline(track, lms, out / f'{stem}.timeline.png', top=args.top,
                                         title=f'{Path(f).name}: top {args.top} {what}'))
        results.append({'file': str(f), 'duration': round(track.duration, 3), 'num_windows': len(track.starts),
                        'window_sec': window / sr,
                        'hop_sec': hop, 'threshold': args.threshold, 'windows': windows,
                        'events': [e._asdict() for e in found], 'outputs': [str(p) for p in written]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f'{r["file"]}: {r["duration"]:g} s, {r["num_windows"]} windows of '
                  f'{r["window_sec"]:g} s every {r["hop_sec"]:g} s; {len(r["events"])} events above {args.threshold:g}')
            for e in r['events'][:MAX_EVENTS_SHOWN]:
                print(f'  {e["start"]:9.2f} {e["end"]:9.2f}  {e["label"]}  {e["peak"]:.3f}')
            if len(r['events']) > MAX_EVENTS_SHOWN:
                print(f'  ... {len(r["events"]) - MAX_EVENTS_SHOWN} more in {r["outputs"][1]}')
            print('  wrote ' + ', '.join(r['outputs']))
    return _report_failures(failures, len(files))
