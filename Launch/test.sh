#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every test (Swift and Python).
# A failing Swift test does not stop the Python tests: both suites always run, and the command
# exits non-zero if either failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash Launch/setup.sh
source Launch/env.sh
# One release build of the programs and the tests (Package.swift makes release builds testable): the tests run
# optimised, and the MPI tests start real mpirun jobs of the release binaries this same build made.
swift build -c release --build-tests
# The JAX reference (Tests/Reference) checks itself, the committed fixtures and the converter.
python3 -c "import jax" >/dev/null 2>&1 || python3 -m pip install -q jax
# TensorBoard's own event reader checks the trainer's event files (a 5.5 MB wheel; seconds to install).
python3 -c "import tensorboard" >/dev/null 2>&1 || python3 -m pip install -q tensorboard
# Logs of this run in a folder of its own (two test runs on one machine do not share them).
logs=$(mktemp -d /tmp/tensorar-test.XXXXXX)
echo "test.sh: logs in $logs"
swift_status=0
swift test -c release --skip-build 2>&1 | tee "$logs/swift-test.log" || swift_status=$?
# The tests that compare floating-point results across processes, batch splits and thread counts
# once more under OpenBLAS's Haswell kernels (AVX2: run on every x86-64 machine this project
# supports), whose rounding depends on the split, so an Intel CI machine also checks what an AMD
# one would see.
if [ "$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo; then
  haswell_filter='ResumeTests.testEvalOfACheckpoint|DistributedTrainingTests|MPITests|SamplerTests'
  haswell_filter="$haswell_filter|ThreadTests|ThreadDeterminismTests"
  OPENBLAS_CORETYPE=Haswell swift test -c release --skip-build \
    --filter "$haswell_filter" 2>&1 \
    | tee "$logs/swift-test-haswell.log" | grep -E -A1 "^Test Suite '(All|Selected) tests' (passed|failed)" \
    || swift_status=$?
fi
# The Python tests in two processes side by side, one per core of a 2-core machine (their time is mostly XLA
# compiling, one thread each): the RAR and Open-MAGVIT2 reference files in one, every other file in the other
# (about even: measured with --durations, the LlamaGen reference alone is the heaviest file).
split_tests="Tests/Reference/test_reference_rar.py Tests/Reference/test_convert_rar.py"
split_tests="$split_tests Tests/Reference/test_reference_omg.py"
python_status=0
python3 -m pytest -q $split_tests >"$logs/pytest-split.log" 2>&1 &
split_pid=$!
other_status=0
python3 -m pytest -q Tests/Reference $(printf -- '--ignore=%s ' $split_tests) >"$logs/pytest-other.log" 2>&1 \
  || other_status=$?
split_status=0
wait $split_pid || split_status=$?
cat "$logs/pytest-split.log" "$logs/pytest-other.log"
[ "$split_status" -eq 0 ] && [ "$other_status" -eq 0 ] || python_status=1
# What failed, last, where a CI log's tail shows it: each failing test's own lines, a crash, pytest's summary.
if [ "$swift_status" -ne 0 ] || [ "$python_status" -ne 0 ]; then
  echo "test.sh: what failed (full logs in $logs):"
  failed_lines="\.swift:[0-9]+: error: |' failed \(|Fatal error|Exited with|unexpected signal|^FAILED |^ERROR "
  grep -h -E "$failed_lines" "$logs"/*.log | head -60 || true
fi
echo "test.sh: swift tests exit status $swift_status, python tests exit status $python_status"
[ "$swift_status" -eq 0 ] && [ "$python_status" -eq 0 ]
