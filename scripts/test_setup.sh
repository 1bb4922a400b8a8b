#!/usr/bin/env bash
# Reference programs and data for the oracle tests. Nothing here is vendored: RELION comes from Debian,
# the cisTEM and cryoDRGN reference files from the published sdists' test data, cached in $2.
set -euo pipefail
PY=${1:-.venv/bin/python}
CACHE=${2:-.cache/refdata}
mkdir -p "$CACHE"

if ! command -v relion_reconstruct >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test-setup: installing Debian's relion (CPU) as an independent oracle"
    (apt-get install -y -qq relion >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null 2>&1; }) || \
      echo "test-setup: could not install relion; RELION oracle tests will be skipped (or fail under CI)"
  fi
fi

fetch_sdist() {  # name version → unpacked folder in the cache
  local name=$1 ver=$2 dest="$CACHE/$1-$2"
  [ -d "$dest" ] && return 0
  local tmp; tmp=$(mktemp -d)
  if "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$name==$ver" >/dev/null 2>&1; then
    mkdir -p "$dest.part" && tar -xzf "$tmp"/*.tar.gz -C "$dest.part" --strip-components=1 && mv "$dest.part" "$dest"
  else
    echo "test-setup: could not fetch $name==$ver sdist; its reference tests will be skipped (or fail under CI)"
  fi
  rm -rf "$tmp"
}
fetch_sdist cryojax 0.6.0
fetch_sdist cryodrgn 4.3.1
echo "test-setup: reference data in $CACHE"
