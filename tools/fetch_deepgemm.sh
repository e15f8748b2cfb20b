#!/usr/bin/env bash
# Fetch DeepGEMM's source distribution (and the headers its build needs) on a machine WITH network access, into the
# git-ignored folder .deepgemm/, which then travels to the GPU machine as a `carry` path; bench/gpu_check.sh builds it
# there. Recipe and reasons: shared/docs/DEEPGEMM_ON_DEVICE.md.
#
#   bash tools/fetch_deepgemm.sh          # -> .deepgemm/deepinfer_gemm-2.8.2.tar.gz, .deepgemm/sysroot/usr/include/...
#
# The archive's address is looked up through pip each time (pip refuses to download it itself: the sdist's metadata
# names the project `deepgemm`), so no index address is written into the repository.
set -euo pipefail

VERSION="${DEEPGEMM_VERSION:-2.8.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.deepgemm"
SDIST="deepinfer_gemm-$VERSION.tar.gz"
mkdir -p "$DEST"
cd "$DEST"

if [[ -s "$SDIST" ]] && tar -tzf "$SDIST" >/dev/null 2>&1; then
    echo "[fetch_deepgemm] $SDIST already present"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # pip fails after resolving (metadata name mismatch); we only want the address it prints with -vvv.
    url="$(python3 -m pip download -vvv --no-deps -d "$tmp/dl" "deepinfer-gemm==$VERSION" 2>&1 \
           | grep -o "https://[^ ]*${SDIST}" | head -1 || true)"
    if [[ -z "$url" ]]; then
        echo "[fetch_deepgemm] ERROR: pip did not report an address for $SDIST (no index access?)" >&2
        exit 1
    fi
    curl -sSfL -o "$SDIST.part" "$url"
    tar -tzf "$SDIST.part" >/dev/null  # a truncated download fails here, not on the GPU machine
    mv "$SDIST.part" "$SDIST"
    echo "[fetch_deepgemm] downloaded $SDIST"
fi

# Headers for DeepGEMM's stack-trace helper (<elfutils/libdwfl.h>, <libelf.h>, <gelf.h>); the build puts
# .deepgemm/sysroot/usr/include on CPATH. Only the headers are carried: the .so files are not needed to compile.
if [[ -f sysroot/usr/include/elfutils/libdwfl.h && -f sysroot/usr/include/libelf.h ]]; then
    echo "[fetch_deepgemm] sysroot headers already present"
else
    debdir="$(mktemp -d)"
    # (apt warns that it downloads "unsandboxed as root" into a private temp dir: harmless, filtered)
    (cd "$debdir" && apt-get download libdw-dev libelf-dev >/dev/null 2> >(grep -v unsandboxed >&2))
    rm -rf sysroot.full && mkdir -p sysroot.full
    for deb in "$debdir"/*.deb; do dpkg -x "$deb" sysroot.full; done
    rm -rf sysroot && mkdir -p sysroot/usr
    cp -a sysroot.full/usr/include sysroot/usr/include
    rm -rf sysroot.full "$debdir"
    echo "[fetch_deepgemm] unpacked libdw-dev/libelf-dev headers into sysroot/usr/include"
fi

echo "[fetch_deepgemm] contents and sizes (the device tool carries at most 64 MiB with the working tree):"
du -sh "$DEST"/*
echo "total: $(du -sh "$DEST" | cut -f1)  ($(find "$DEST" -type f | wc -l) files)"
