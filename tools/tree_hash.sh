#!/usr/bin/env bash
# A hash of the package, test and benchmark sources as they are on disk (committed or not): gpu_check.sh prints it
# on the device, where the checkout's git log can be stale, and the same command here says which commit ran.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
find fp8_deep tests bench tools setup.py -type f \( -name '*.py' -o -name '*.sh' \) -not -path '*/__pycache__/*' \
    | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12
