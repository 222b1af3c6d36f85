#!/usr/bin/env bash
# Data-parallel training over the nodes of a hostfile (Open MPI's mpirun), threads per rank set
# explicitly. Run from the repository root on the first node:
#   NODES=4 RANKS_PER_NODE=2 CORES_PER_NODE=64 Launch/cluster/run-hostfile.sh Launch/cluster/hosts.example \
#       Configs/llamagen-b-imagenet256.yaml [--set key=value ...]
# Each rank gets T = CORES_PER_NODE / RANKS_PER_NODE cores: mpirun binds it to them
# (--map-by ppr:N:node:pe=T --bind-to core) and BLAS, AdamW and OpenMP use THREADS (default T)
# threads; THREADS=T-1 leaves a core of each rank to the gradient-communication thread.
# global_batch must be a multiple of micro_batch x NODES x RANKS_PER_NODE (the rest is accumulation).
set -euo pipefail
HOSTFILE=${1:?usage: run-hostfile.sh HOSTFILE CONFIG [tensorar-train arguments]}
shift
NODES=${NODES:-$(grep -cvE '^\s*(#|$)' "$HOSTFILE")}
RANKS_PER_NODE=${RANKS_PER_NODE:-1}
CORES_PER_NODE=${CORES_PER_NODE:-$(nproc)}
T=$((CORES_PER_NODE / RANKS_PER_NODE))
THREADS=${THREADS:-$T}
N=$((NODES * RANKS_PER_NODE))
echo "run-hostfile: $NODES node(s) x $RANKS_PER_NODE rank(s) x $T core(s), $THREADS compute thread(s) = $N rank(s)"
EXPORT=(-x OMP_NUM_THREADS="$THREADS" -x OPENBLAS_NUM_THREADS="$THREADS" -x PATH)
[ -n "${LD_LIBRARY_PATH:-}" ] && EXPORT+=(-x LD_LIBRARY_PATH)
exec mpirun -n "$N" --hostfile "$HOSTFILE" \
  --map-by "ppr:${RANKS_PER_NODE}:node:pe=${T}" --bind-to core --report-bindings "${EXPORT[@]}" \
  .build/release/tensorar-train "$@" --set dist.threads_per_rank="$THREADS"
