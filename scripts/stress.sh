#!/usr/bin/env bash
# Run the long, randomized stress tests that the default suite skips
# (tests marked @pytest.mark.stress): crash stress, torture, the crash-torture
# matrix, fuzzing at scale.
#
#   scripts/stress.sh [PYTEST ARGS]          the stress-marked tests
#   scripts/stress.sh lanes [PYTEST ARGS]    the resume/DLQ/lock integration suite and 50
#       crash-stress trials with every map at concurrency 8 (MRPOOL_TEST_CONCURRENCY=8)
#   scripts/stress.sh matrix [MATRIX ARGS]   scripts/torture_matrix.py alone, e.g.
#       scripts/stress.sh matrix --trials 600 --seed 21 --jobs 2
#       scripts/stress.sh matrix --cells 'resume/supervisor/*' --trials 30
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = lanes ]; then
    # the seed integration suite and the crash stress with map.concurrency: 8
    shift
    MRPOOL_TEST_CONCURRENCY=8 python3 -m pytest -q tests/test_resume_dlq_lock_integration.py "$@"
    exec env MRPOOL_TEST_CONCURRENCY=8 python3 scripts/crash_stress.py --trials 50
fi
if [ "${1:-}" = matrix ]; then
    shift
    exec python3 scripts/torture_matrix.py "$@"
fi
MRPOOL_STRESS=1 exec python3 -m pytest -m stress -q "$@"
