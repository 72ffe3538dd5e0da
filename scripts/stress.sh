#!/usr/bin/env bash
# Run the long, randomized stress tests that the default suite skips
# (tests marked @pytest.mark.stress): crash stress, torture, fuzzing at scale.
set -euo pipefail
cd "$(dirname "$0")/.."
MRPOOL_STRESS=1 exec python3 -m pytest -m stress -q "$@"
