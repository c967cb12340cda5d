#!/usr/bin/env python
"""How long importing the package takes, next to what it is measured against, each in fresh interpreters.

    python tools/analysis/import_time.py [--repeats 5]

Rows: ``import torch``; the three frameworks' ``registry`` modules (what a config's ``default_scope`` imports
anyway); ``import sparsevit_mm`` (what ``custom_imports`` does); ``import sparsevit_mm.layers``; and building
DynamicViT from a config dict (the first build imports its module). Each is the median wall time of ``--repeats``
fresh interpreters, interleaved so that machine load hits every row alike.
"""
import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATEMENTS = {
    'import torch': 'import torch',
    'mmpretrain / mmdet / mmseg registries': 'import mmpretrain.registry, mmdet.registry, mmseg.registry',
    'import sparsevit_mm': 'import sparsevit_mm',
    'import sparsevit_mm.layers': 'import sparsevit_mm.layers',
    'sparsevit_mm + build DynamicViT': "import sparsevit_mm; from mmengine.registry import MODELS; "
                                       "MODELS.build(dict(type='DynamicViT', arch='deit-tiny'))",
}


def seconds(statement: str) -> float:
    code = f'import time; start = time.perf_counter(); {statement}; print(time.perf_counter() - start)'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description='Import time of the package, in fresh interpreters')
    parser.add_argument('--repeats', type=int, default=5, help='fresh interpreters per measurement (median)')
    args = parser.parse_args(argv)
    times = {name: [] for name in STATEMENTS}
    for _ in range(args.repeats):
        for name, statement in STATEMENTS.items():
            times[name].append(seconds(statement))
    print(f'{"what":>40} | {"seconds (median of " + str(args.repeats) + ")":>22}')
    table = {}
    for name, values in times.items():
        table[name] = statistics.median(values)
        print(f'{name:>40} | {table[name]:>22.2f}')
    return table


if __name__ == '__main__':
    main()
