#!/usr/bin/env bash
# Data-parallel scaling and memory, measured with the release tensorar-train under mpirun.
# Prints a table of the step time split into compute, allreduce wait and data wait (rank 0, mean
# over the steps after the first), for:
#   - the default config (Configs/default.yaml: global batch 64, micro-batch 8) on 1, 2, 4, 8 ranks,
#     and on 2 ranks with blocking instead of overlapped allreduce;
#   - preset B with the paper's plug-in (k = 4, d = 2, 140M parameters) at a small batch (global 2,
#     micro-batch 1) on 1 and 2 ranks, overlapped and blocking, on a synthetic B-shaped token cache
#     (V = 16384, grid 16x16, C = 1000; random codes written as .npy and imported with
#     `tensorar-data import-llamagen`: the step time does not depend on the token values);
#   - with MEMORY=1 (default): preset B, k = 4, d = 2 at micro-batch 8 (8 x 256 tokens) on one rank,
#     its start-up memory breakdown and measured peak resident memory.
#   - with ZERO=1 (default): preset B, k = 4, d = 2 (micro-batch 1, one per rank) on 2 and 4 ranks
#     with dist.shard_optimizer none, states and states+grads: the per-rank estimate beside rank 0's
#     measured peak resident memory, and the step and AdamW times;
#   - with RECOMPUTE=1 (default): the same on 2 ranks with train.recompute blocks, and the step
#     time with and without recompute (tensorar-bench --recompute both: interleaved in one process).
#   - with LAYOUT=1 (not by default): the default run on 1 rank x 2 threads against 2 ranks x 1 thread
#     (README target: within 10%), ROUNDS rounds alternated, and 1 rank x 2 threads with one micro-batch
#     at a time (train.parallel_micro_batches=1). For that figure alone:
#     DP=0 MEMORY=0 ZERO=0 RECOMPUTE=0 LAYOUT=1 ROUNDS=6 Launch/scaling.sh
#   - with ZEROTIME=1 (not by default): the step time with and without sharding on 2 ranks (README
#     target: within 5% of none), preset B k = 4, d = 2, micro-batch 1, default overlap (gradients and
#     parameter gather), in ROUNDS rounds (3) alternating none, states, states+grads, and states with
#     the blocking gather (dist.overlap_gather=false); ZSTEPS steps each (8), mean of the steps after
#     the first. For that figure alone: DP=0 MEMORY=0 ZERO=0 RECOMPUTE=0 ZEROTIME=1 Launch/scaling.sh
# Environment: STEPS (default-config steps, 30), BSTEPS (preset-B steps, 3), MEMORY (1), ZERO (1), RECOMPUTE (1),
# DP (1: the step-time table), LAYOUT (0), ZEROTIME (0), ROUNDS (3), ZSTEPS (8),
# OUT (work folder, /tmp/tensorar-scaling).
# On 2 cores the 4- and 8-rank runs are oversubscribed.
# Measured numbers and the 64-node estimate: README.md, section "Scaling".
set -euo pipefail
cd "$(dirname "$0")/.."
source Launch/env.sh
STEPS=${STEPS:-30}
BSTEPS=${BSTEPS:-3}
MEMORY=${MEMORY:-1}
ZERO=${ZERO:-1}
RECOMPUTE=${RECOMPUTE:-1}
DP=${DP:-1}
ZEROTIME=${ZEROTIME:-0}
LAYOUT=${LAYOUT:-0}
ROUNDS=${ROUNDS:-3}
ZSTEPS=${ZSTEPS:-8}
OUT=${OUT:-/tmp/tensorar-scaling}
EXE=.build/release/tensorar-train
[ -x "$EXE" ] || { echo "scaling: $EXE is missing: run 'swift build -c release' first" >&2; exit 1; }
[ -f Data/fashion-mnist/train/dataset.json ] || .build/release/tensorar-data fashion-mnist --out Data/fashion-mnist
mkdir -p "$OUT"

# A B-shaped synthetic cache (64 images).
BCACHE="$OUT/b-cache"
if [ ! -f "$BCACHE/dataset.json" ]; then
  python3 - "$OUT" <<'EOF'
import os, sys
import numpy as np
out = sys.argv[1]
rng = np.random.default_rng(0)
for d in ("codes", "labels"):
    os.makedirs(f"{out}/b-npy/{d}", exist_ok=True)
for i in range(64):
    np.save(f"{out}/b-npy/codes/{i}.npy", rng.integers(0, 16384, size=(1, 1, 256), dtype=np.int64))
    np.save(f"{out}/b-npy/labels/{i}.npy", np.array([rng.integers(0, 1000)], dtype=np.int64))
EOF
  .build/release/tensorar-data import-llamagen --codes "$OUT/b-npy/codes" --labels "$OUT/b-npy/labels" --out "$BCACHE" \
    --num-classes 1000 --vocab-size 16384 >/dev/null
fi

# run NAME CONFIG-LABEL RANKS MODE [tensorar-train arguments...]
run() {
  local name=$1 label=$2 ranks=$3 mode=$4; shift 4
  local overlap=true; [ "$mode" = blocking ] && overlap=false
  local log="$OUT/$name.log" load
  load=$(cut -d' ' -f1 /proc/loadavg)
  [ "$ranks" = 1 ] && mode="-"  # one rank: nothing to reduce
  rm -rf "$OUT/ckpt/$name"  # this script's own run folder from an earlier run
  if ! mpirun -n "$ranks" --bind-to none "$EXE" "$@" --set dist.overlap=$overlap --set data.val=null \
        --set checkpoint.dir="$OUT/ckpt" --set checkpoint.run="$name" --set checkpoint.resume=never \
        --set checkpoint.every=0 >"$log" 2>&1; then
    echo "scaling: run $name failed, see $log" >&2; tail -5 "$log" >&2; exit 1
  fi
  python3 - "$log" "$label" "$ranks" "$mode" "$load" <<'EOF'
import re, sys
log, label, ranks, mode, load = sys.argv[1:]
text = open(log).read()
m = re.search(r"time per step: compute ([\d.]+) s, allreduce wait ([\d.]+) s \(([\d.]+)%\), data wait ([\d.]+) s, "
              r"optimizer ([\d.]+) s.*allreduce alone ([\d.]+) s", text)
g = re.search(r"= global batch (\d+)", text)
if not m or not g:
    sys.exit(f"scaling: no timing line in {log}")
c, a, pct, d, o, alone = map(float, m.groups())
step = c + a + d + o
print(f"| {label} | {ranks} | {mode} | {c:.3f} | {a:.3f} | {pct:.1f} | {alone:.3f} | {d:.4f} | {o:.3f} | "
      f"{step:.3f} | {int(g.group(1)) / step:.3g} | {load} |")
EOF
}

DEF=(--set train.steps="$STEPS" --set train.log_every=1000 --set optim.warmup_plugin=0 --set optim.warmup_base=0)

if [ "$DP" = 1 ]; then
echo "Step time of rank 0 in seconds (mean over the steps after the first); load: the machine's 1-minute load"
echo "average when the run started (other work on the machine slows every figure)."
echo
printf "| config | ranks | allreduce | compute | allreduce wait | wait %% | allreduce alone | "
printf "data wait | optimizer | step | images/s | load |\n"
printf "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
for r in 1 2 4 8; do run "default-$r" "default (1.7M, batch 64)" "$r" overlapped "${DEF[@]}"; done
run default-2-blocking "default (1.7M, batch 64)" 2 blocking "${DEF[@]}"
# 1.7M parameters are 6.8 MB of gradients: one 25 MB bucket, ready only when backward ends. With
# 1 MB buckets the first ones are reduced while backward still runs.
run default-2-bucket1 "default, 1 MB buckets" 2 overlapped "${DEF[@]}" --set dist.bucket_mb=1

B=(Configs/llamagen-b-imagenet256.yaml --set data.train="$BCACHE" --set model.init_from=null --set train.global_batch=2
   --set train.micro_batch=1 --set train.steps="$BSTEPS" --set train.log_every=1)
run b-1 "B k4 d2 (140M, batch 2)" 1 blocking "${B[@]}"
run b-2 "B k4 d2 (140M, batch 2)" 2 overlapped "${B[@]}"
run b-2-blocking "B k4 d2 (140M, batch 2)" 2 blocking "${B[@]}"
fi

if [ "$LAYOUT" = 1 ]; then
  echo
  echo "The default run on 1 rank x 2 threads against 2 ranks x 1 thread (README target: within 10%), $ROUNDS"
  echo "rounds alternated, $STEPS steps each; '1 at a time': train.parallel_micro_batches=1 instead of the config's 2:"
  echo
  printf "| config | ranks | allreduce | compute | allreduce wait | wait %% | allreduce alone | "
  printf "data wait | optimizer | step | images/s | load |\n"
  printf "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
  rows="$OUT/layout-rows.md"
  : >"$rows"
  for round in $(seq 1 "$ROUNDS"); do
    run "layout-$round-1x2" "1 rank x 2 threads" 1 overlapped "${DEF[@]}" --set dist.threads_per_rank=2 | tee -a "$rows"
    run "layout-$round-2x1" "2 ranks x 1 thread" 2 overlapped "${DEF[@]}" --set dist.threads_per_rank=1 | tee -a "$rows"
    run "layout-$round-1x2-one" "1 rank x 2 threads, 1 at a time" 1 overlapped "${DEF[@]}" \
      --set dist.threads_per_rank=2 --set train.parallel_micro_batches=1 | tee -a "$rows"
  done
  python3 - "$rows" <<'EOF'
import sys
steps = [float(l.split("|")[10]) for l in open(sys.argv[1]) if l.startswith("|")]
rounds = [steps[i:i + 3] for i in range(0, len(steps) - 2, 3)]
def ratios(j):
    per = ", ".join(f"{r[j] / r[1]:.3f}" for r in rounds)
    return f"{per} (all rounds {sum(r[j] for r in rounds) / sum(r[1] for r in rounds):.3f})"
print()
print(f"1 rank x 2 threads / 2 ranks x 1 thread, step time per round: side by side {ratios(0)}; "
      f"1 at a time {ratios(2)}")
EOF
fi

if [ "$MEMORY" = 1 ]; then
  log="$OUT/b-memory.log"
  mpirun -n 1 --bind-to none "$EXE" Configs/llamagen-b-imagenet256.yaml --set data.train="$BCACHE" --set data.val=null \
    --set model.init_from=null --set train.global_batch=8 --set train.micro_batch=8 --set train.steps=2 \
    --set train.log_every=1 \
    --set checkpoint.dir="$OUT/ckpt" --set checkpoint.run=b-memory --set checkpoint.resume=never >"$log" 2>&1 \
    || { echo "scaling: memory run failed, see $log" >&2; exit 1; }
  echo
  echo "preset B, k = 4, d = 2, micro-batch 8 x 256 tokens, one rank:"
  grep -E "^memory" "$log"
fi

# zero_row RANKS SHARD RECOMPUTE: one row of the ZeRO / recompute table (preset B k4 d2, micro-batch 1).
zero_row() {
  local ranks=$1 zero=$2 recompute=$3 load
  local log="$OUT/zero-$ranks-$zero-$recompute.log"
  rm -rf "$OUT/ckpt/zero-$ranks-$zero-$recompute"  # this script's own run folder from an earlier run
  load=$(cut -d' ' -f1 /proc/loadavg)
  mpirun -n "$ranks" --bind-to none "$EXE" Configs/llamagen-b-imagenet256.yaml --set data.train="$BCACHE" \
    --set data.val=null --set model.init_from=null --set train.global_batch="$ranks" --set train.micro_batch=1 \
    --set train.steps="$BSTEPS" --set train.log_every=1 --set dist.shard_optimizer="$zero" --set dist.overlap=false \
    --set train.recompute="$recompute" \
    --set checkpoint.dir="$OUT/ckpt" --set checkpoint.run="zero-$ranks-$zero-$recompute" --set checkpoint.resume=never \
    --set checkpoint.every=0 >"$log" 2>&1 \
    || { echo "scaling: ZeRO run failed, see $log" >&2; tail -5 "$log" >&2; exit 1; }
  python3 - "$log" "$ranks" "$zero" "$recompute" "$load" <<'EOF'
import re, sys
log, ranks, zero, recompute, load = sys.argv[1:]
text = open(log).read()
est = re.search(r"total ([\d.]+) MB \+ the runtime", text)
peak = re.search(r"peak resident ([\d.]+) MB", text)
t = re.search(r"time per step: compute ([\d.]+) s, allreduce wait ([\d.]+) s .*data wait ([\d.]+) s, "
              r"optimizer ([\d.]+) s", text)
g = re.search(r"parameter allgather ([\d.]+) s", text)
if not (est and peak and t):
    sys.exit(f"scaling: no memory or timing line in {log}")
c, a, d, o = map(float, t.groups())
gather = float(g.group(1)) if g else 0.0
print(f"| {ranks} | {zero} | {recompute} | {est.group(1)} | {peak.group(1)} | {c + a + d + o + gather:.2f} | "
      f"{a:.3f} | {o:.3f} | {gather:.3f} | {load} |")
EOF
}
ZERO_HEAD="| ranks | dist.shard_optimizer | train.recompute | estimate MB | measured peak MB | step s | "
ZERO_HEAD+="reduce wait s | AdamW s | allgather s | load |"

if [ "$ZERO" = 1 ]; then
  echo
  echo "ZeRO, preset B k = 4, d = 2, micro-batch 1 x 256 tokens per rank, $BSTEPS steps (rank 0; MB = 10^6 bytes):"
  echo
  echo "$ZERO_HEAD"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for ranks in 2 4; do
    for zero in none states states+grads; do zero_row "$ranks" "$zero" none; done
  done
fi

if [ "$RECOMPUTE" = 1 ]; then
  echo
  echo "Recompute, preset B k = 4, d = 2, micro-batch 1 x 256 tokens per rank, 2 ranks, $BSTEPS steps (rank 0):"
  echo
  echo "$ZERO_HEAD"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for zero in none states states+grads; do zero_row 2 "$zero" blocks; done
  echo
  echo "Step time with and without recompute, interleaved in one process" \
    "(1 thread; load $(cut -d' ' -f1 /proc/loadavg)):"
  .build/release/tensorar-bench --presets B --batches 2 --window 4 --depth 2 --recompute both --threads 1 --steps 2 \
    | grep -E "recompute blocks"
fi

# zero_time_row ROUND SHARD OVERLAP_GATHER: one run of the sharding step-time comparison (2 ranks).
zero_time_row() {
  local round=$1 zero=$2 gather=$3 load
  local log="$OUT/zerotime-$round-$zero-$gather.log"
  # this script's own run folder from an earlier run (its final checkpoint: 2 GB)
  rm -rf "$OUT/ckpt/zerotime-$round-$zero-$gather"
  load=$(cut -d' ' -f1 /proc/loadavg)
  mpirun -n 2 --bind-to none "$EXE" Configs/llamagen-b-imagenet256.yaml --set data.train="$BCACHE" \
    --set data.val=null --set model.init_from=null --set train.global_batch=2 --set train.micro_batch=1 \
    --set train.steps="$ZSTEPS" --set train.log_every=1 --set dist.shard_optimizer="$zero" \
    --set dist.overlap_gather="$gather" --set checkpoint.dir="$OUT/ckpt" \
    --set checkpoint.run="zerotime-$round-$zero-$gather" --set checkpoint.resume=never --set checkpoint.every=0 \
    >"$log" 2>&1 || { echo "scaling: ZeRO timing run failed, see $log" >&2; tail -5 "$log" >&2; exit 1; }
  python3 - "$log" "$round" "$zero" "$gather" "$load" <<'EOF'
import re, sys
log, rnd, zero, gather, load = sys.argv[1:]
text = open(log).read()
t = re.search(r"time per step: compute ([\d.]+) s, allreduce wait ([\d.]+) s .*data wait ([\d.]+) s, "
              r"optimizer ([\d.]+) s", text)
g = re.search(r"parameter allgather ([\d.]+) s", text)
if not t:
    sys.exit(f"scaling: no timing line in {log}")
c, a, d, o = map(float, t.groups())
w = float(g.group(1)) if g else 0.0
shown = gather if zero != "none" else "-"
print(f"| {rnd} | {zero} | {shown} | {c + a + d + o + w:.3f} | {c:.3f} | {a:.3f} | {o:.3f} | {w:.3f} | {load} |")
EOF
}

if [ "$ZEROTIME" = 1 ]; then
  echo
  echo "Step time with and without sharding, preset B k = 4, d = 2, micro-batch 1 per rank, 2 ranks, $ZSTEPS steps"
  echo "(rank 0, mean of the steps after the first; gather s: what the next forward waited for the allgather):"
  echo
  echo "| round | dist.shard_optimizer | dist.overlap_gather | step s |" \
    "compute s | reduce wait s | AdamW s | gather s | load |"
  echo "|---|---|---|---|---|---|---|---|---|"
  rows="$OUT/zerotime-rows.md"
  : >"$rows"
  for round in $(seq 1 "$ROUNDS"); do
    for setting in "none true" "states true" "states+grads true" "states false"; do
      # shellcheck disable=SC2086
      zero_time_row "$round" $setting | tee -a "$rows"
    done
  done
  python3 - "$rows" <<'EOF'
import sys
rows = [l.strip().strip("|").split("|") for l in open(sys.argv[1]) if l.startswith("|")]
steps = {}
for r in rows:
    steps.setdefault((r[1].strip(), r[2].strip()), []).append(float(r[3]))
none = sum(steps[("none", "-")]) / len(steps[("none", "-")])
print()
for (zero, gather), v in steps.items():
    mean = sum(v) / len(v)
    change = 100 * (mean / none - 1)
    print(f"{zero} (overlap_gather {gather}): mean step {mean:.3f} s over {len(v)} round(s), {change:+.1f}% vs none")
EOF
fi
