"""`m2d predict FILES... --weights FT_FILE [--top K] [--json] [--timeline ...]`: labels of audio files."""

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

examples:
  m2d predict clip.wav --weights m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly
  m2d predict meeting.wav --weights m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly --timeline --plot
  m2d predict clips/*.wav --weights eval/.../weights_best.pth --top 3 --json > predictions.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument('files', nargs='+', metavar='FILE', help='audio files (folders are searched recursively)')
    parser.add_argument('--weights', '-w', required=True, metavar='FT_FILE',
                        help='a fine-tuned weight file, or a released fine-tuned model name')
    parser.add_argument('--top', type=int, default=5, metavar='K', help='labels shown per file or window (default %(default)s)')
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
    if args.top < 1:
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

    from ..evaluate.predict import load_classifier, predict_files
    from ..runtime import resolve_device

    _check(args)
    files = _files(args)
    clf = load_classifier(args.weights, multilabel=True if args.multilabel else None, trust=args.trust,
                          bf16=args.bf16)
    device = resolve_device(args.device)
    if args.timeline:
        return _run_timeline(args, clf, files, device)
    results, failures = predict_files(clf, files, top=args.top, unit_sec=args.unit_sec, device=device)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r['file'] + '\t' + '  '.join(f'{t["label"]} {t["probability"]:.3f}' for t in r['top']))
    return _report_failures(failures, len(files))


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
        _write_csv(out / f'{stem}.windows.csv', ['start', 'end', 'label', 'p'],
                   [[w['start'], w['end'], w['label'], w['p']] for w in windows])
        _write_csv(out / f'{stem}.events.csv', ['start', 'end', 'label', 'peak_p'], [list(e) for e in found])
        written = [out / f'{stem}.windows.csv', out / f'{stem}.events.csv']
        if args.plot:
            from ..audio import LogMelSpectrogram, preset, stream_audio
            lms = logmel_overview(stream_audio(f, sr, block_samples=60 * sr), LogMelSpectrogram(preset(sr)),
                                  int(round(track.duration * sr)))
            written.append(plot_timeline(track, lms, out / f'{stem}.timeline.png', top=args.top,
                                         title=f'{Path(f).name}: top {args.top} classes'))
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
