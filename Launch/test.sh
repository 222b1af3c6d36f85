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
if ls Tests/Reference/test_*.py >/dev/null 2>&1; then
  python3 -m pytest -q Tests/Reference
fi
