#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every test (Swift and Python).
# A failing Swift test does not stop the Python tests: both suites always run, and the command
# exits non-zero if either failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash Launch/setup.sh
source Launch/env.sh
swift build --build-tests
# The MPI tests start real mpirun jobs of the release binaries.
swift build -c release
# The JAX reference (Tests/Reference) checks itself, the committed fixtures and the converter.
python3 -c "import jax" >/dev/null 2>&1 || python3 -m pip install -q jax
# TensorBoard's own event reader checks the trainer's event files (a 5.5 MB wheel; seconds to install).
python3 -c "import tensorboard" >/dev/null 2>&1 || python3 -m pip install -q tensorboard
swift_status=0
swift test --skip-build 2>&1 | tee /tmp/tensorar-swift-test.log || swift_status=$?
# The tests that compare floating-point results across processes, batch splits and thread counts
# once more under OpenBLAS's Haswell kernels (AVX2: run on every x86-64 machine this project
# supports), whose rounding depends on the split, so an Intel CI machine also checks what an AMD
# one would see.
if [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo; then
  OPENBLAS_CORETYPE=Haswell swift test --skip-build \
    --filter 'ResumeTests.testEvalOfACheckpoint|DistributedTrainingTests|MPITests|SamplerTests|ThreadTests|ThreadDeterminismTests' 2>&1 \
    | tee /tmp/tensorar-swift-test-haswell.log | tail -3 || swift_status=$?
fi
python_status=0
python3 -m pytest -q Tests/Reference || python_status=$?
echo "test.sh: swift tests exit status $swift_status, python tests exit status $python_status"
[ "$swift_status" -eq 0 ] && [ "$python_status" -eq 0 ]
