#!/bin/bash
# Before (e125a6b, its own scripts, from a worktree at /tmp/before) and after (this tree), alternated
# three times per benchmark and thread count, so that drift of the machine hits both alike.
OUT=${OUT:-/work/main/benchmarks/results/issue13/round2/alternated}
PY=/work/main/.venv/bin/python
mkdir -p $OUT
cd /work/main
uptime > $OUT/load.log
for k in 1 2 3; do
  for t in 1 2; do
    for tree in before after; do
      if [ $tree = before ]; then ENV="PYTHONPATH=/tmp/before/src"; B=/tmp/before/benchmarks; else ENV=""; B=benchmarks; fi
      env $ENV $PY $B/pretrain.py --threads $t --steps 5 --keep_freed_memory --json $OUT/pretrain_${tree}_t${t}_r$k.json > $OUT/pretrain_${tree}_t${t}_r$k.log 2>&1
      env $ENV $PY $B/encode.py --threads $t --runs 7 --keep_freed_memory --json $OUT/encode_${tree}_t${t}_r$k.json > $OUT/encode_${tree}_t${t}_r$k.log 2>&1
    done
    uptime >> $OUT/load.log
  done
done
echo finished >> $OUT/load.log
