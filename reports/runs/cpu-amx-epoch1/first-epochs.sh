#!/usr/bin/env bash
# The first epoch of the default run at full size, per seed, on this machine with torch's
# own thread count: the train stage alone (python src/train.py) in a temp copy of src/ and
# params.yaml (train.seed set, train.checkpoint_minutes 0) over this project's processed
# data, stopped once epoch 1's line is printed. Seeds run one after another; none starts
# within 7 minutes of DEADLINE (seconds since the epoch). docs/recipe.md, "At full size on
# a CPU". Each console goes to OUT/bf16-2threads-s<seed>.txt.
#     reports/runs/cpu-amx-epoch1/first-epochs.sh OUT DEADLINE SEED...
set -u
project=$(cd "$(dirname "$0")/../../.." && pwd)
out_dir=$1 deadline=$2
shift 2
mkdir -p "$out_dir"
for seed in "$@"; do
  if (($(date +%s) + 420 > deadline)); then echo "deadline: seed $seed not started"; break; fi
  root=$(mktemp -d)
  cp -r "$project/src" "$root/src"
  mkdir -p "$root/data" "$root/tmp"
  ln -s "$project/data/processed" "$root/data/processed"
  "$project/.venv/bin/python" - "$project/params.yaml" "$root/params.yaml" "$seed" <<'PY'
import sys

import yaml

params = yaml.safe_load(open(sys.argv[1]))
params["train"]["seed"] = int(sys.argv[3])
params["train"]["checkpoint_minutes"] = 0
yaml.safe_dump(params, open(sys.argv[2], "w"), sort_keys=False)
PY
  console=$out_dir/bf16-2threads-s$seed.txt
  : >"$console"
  # exec: $run is the train stage itself, so the wait below outlasts its exit
  (cd "$root" && TMPDIR=$root/tmp PYTHONUNBUFFERED=1 exec "$project/.venv/bin/python" src/train.py >"$console" 2>&1) &
  run=$!
  while kill -0 $run 2>/dev/null; do
    if grep -q "epoch 1/[0-9]*: train loss" "$console"; then
      kill -TERM $run
      break
    fi
    sleep 3
  done
  wait $run 2>/dev/null
  grep "epoch 1/[0-9]*: train loss" "$console" | sed "s/^/seed $seed: /"
  rm -rf "$root"
done
