#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every test (Swift and Python).
set -euo pipefail
cd "$(dirname "$0")/.."
bash Launch/setup.sh
source Launch/env.sh
swift build --build-tests
# The MPI tests start real mpirun jobs of the release binaries.
swift build -c release
swift test --skip-build 2>&1 | tee /tmp/tensorar-swift-test.log
# The JAX reference (Tests/Reference) checks itself, the committed fixtures and the converter.
python3 -c "import jax" >/dev/null 2>&1 || python3 -m pip install -q jax
python3 -m pytest -q Tests/Reference
