#!/usr/bin/env bash
# The default job on a fresh machine: packages, release build, the Fashion-MNIST token cache,
# then the default training run on RANKS MPI ranks (default 8, oversubscribed on a small machine).
# Extra arguments go to tensorar-train, e.g. Launch/quickstart.sh --set train.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${RANKS:-8}
bash Launch/setup.sh
source Launch/env.sh
echo "quickstart: building (release)"
swift build -c release 2>&1 | tail -1
.build/release/tensorar-data fashion-mnist --out Data/fashion-mnist
echo "quickstart: training on $RANKS rank(s)"
mpirun -n "$RANKS" --bind-to none .build/release/tensorar-train "$@"
