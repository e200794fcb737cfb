"""What the Python that runs s3prl can import (run as a script by that Python; standard library only).

    PYTHON probe.py S3PRL_DIR DOWNSTREAM UPSTREAM   ->  one line 'M2D-PROBE {json}' on stdout

It imports what `S3PRL_DIR/run_downstream.py` imports, `m2d` and `s3prl.downstream.DOWNSTREAM.expert`,
with `S3PRL_DIR` first on sys.path as when s3prl runs there. A missing module is recorded and
replaced by an empty stand-in, and the import is tried again, so that every missing module is
named in one pass (not only the first). The JSON: python, torch (version or null), cuda,
cuda_count, s3prl (the folder it is imported from, or null), upstream (whether s3prl.hub has
UPSTREAM; null when s3prl.hub could not be imported), missing ({module: the import that needs
it}), errors (other import failures, one line each).
"""

import ast
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

MARK = 'M2D-PROBE '
MAX_RETRIES = 30


class _Anything:
    """What a stand-in module's attributes are: classes that accept any call, any attribute."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)
        return _Anything()


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for the names in `missing` and their submodules; any attribute is an `_Anything` class
    (so that code run at import time, e.g. `torchaudio.set_audio_backend('sox_io')`, goes on)."""

    def __init__(self):
        self.missing: dict[str, str] = {}

    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + '.') for m in self.missing):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attr(name):
            if name.startswith('__'):
                raise AttributeError(name)
            return type(name, (_Anything,), {})

        module.__getattr__ = attr
        return module

    def exec_module(self, module):
        pass


def script_imports(path: str) -> list[str]:
    """Absolute module names imported at the top level of a script."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return list(dict.fromkeys(names))


def probe(s3prl_dir: str, downstream: str, upstream: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]
    sys.path.insert(0, s3prl_dir)
    out = {'python': sys.version.split()[0], 'torch': None, 'cuda': False, 'cuda_count': 0, 's3prl': None,
           'upstream': False, 'missing': {}, 'errors': []}
    stand_ins = _StandIns()
    sys.meta_path.insert(0, stand_ins)
    targets = {'torch': 'run_downstream.py'}
    targets.update((name, 'run_downstream.py') for name in script_imports(os.path.join(s3prl_dir, 'run_downstream.py')))
    targets.update({'s3prl.hub': 's3prl.hub', 'm2d': 'the m2d upstream', f's3prl.downstream.{downstream}.expert':
                    f's3prl.downstream.{downstream}.expert'})
    for target, label in targets.items():
        for _ in range(MAX_RETRIES):
            try:
                importlib.import_module(target)
                break
            except ModuleNotFoundError as e:
                name = e.name or str(e)
                if name in stand_ins.missing:
                    out['errors'].append(f'{target}: {type(e).__name__}: {e}')
                    break
                stand_ins.missing[name] = target if name != target else label
                if name.split('.')[0] == 's3prl':  # nothing of s3prl can be checked without it
                    break
            except BaseException as e:  # noqa: BLE001 - any failure of an import is a finding
                first = (str(e).strip().splitlines() or [''])[0]
                out['errors'].append(f'{target}: {type(e).__name__}: {first}')
                break
    out['missing'] = dict(stand_ins.missing)
    torch = sys.modules.get('torch')
    if torch is not None and 'torch' not in stand_ins.missing:
        out['torch'] = getattr(torch, '__version__', None)
        try:
            out['cuda'] = bool(torch.cuda.is_available())
            out['cuda_count'] = int(torch.cuda.device_count())
        except Exception:  # noqa: BLE001
            pass
    s3prl = sys.modules.get('s3prl')
    if s3prl is not None and not any(m.split('.')[0] == 's3prl' for m in stand_ins.missing):
        out['s3prl'] = os.path.dirname(os.path.abspath(getattr(s3prl, '__file__', None) or s3prl_dir))
        hub = sys.modules.get('s3prl.hub')
        out['upstream'] = None if hub is None else hasattr(hub, upstream)  # None: s3prl.hub failed to import
    return out


if __name__ == '__main__':
    result = probe(*sys.argv[1:4])
    sys.stdout.flush()
    print(MARK + json.dumps(result), flush=True)
