"""`m2d download NAME... [--cache DIR]` and `m2d download --list`: released weights into the cache."""

from __future__ import annotations

import argparse
import logging

from . import CommandError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('names', nargs='*', metavar='NAME', help='released model names (see --list)')
    parser.add_argument('--list', action='store_true', help='list the released models and which are cached')
    parser.add_argument('--cache', metavar='DIR', default=None,
                        help='cache folder (default: $M2D_CACHE or ~/.cache/m2d)')
    parser.add_argument('--quiet', '-q', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from .. import hub

    if args.list:
        print(f'cache: {hub.cache_dir(args.cache)}')
        for name, tag, path in hub.list_releases(args.cache):
            print(f'{name:<58} {tag}  {path if path else "-"}')
        return 0
    if not args.names:
        raise CommandError('give model names, or --list to see them')
    for name in args.names:  # every name is checked before anything is downloaded
        hub.release_url(name)
    failed: list[hub.DownloadError] = []
    for name in args.names:  # one failed download does not stop the others
        try:
            print(hub.download(name, cache=args.cache, progress=not args.quiet))
        except hub.DownloadError as e:
            log.debug('%s', e)
            failed.append(e)
    if len(args.names) == 1 and failed:
        raise failed[0]
    if failed:
        raise hub.DownloadError(f'{len(failed)} of {len(args.names)} downloads failed: '
                                + ' | '.join(map(str, failed)))
    return 0
