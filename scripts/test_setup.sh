#!/usr/bin/env bash
# Reference programs and data for the oracle tests (tests/reference/test_ref_*.py), and Xvfb for the GUI tests
# (tests/gui/test_gui.py). Nothing here is vendored: RELION and Xvfb come from Debian/Ubuntu, the cisTEM and cryoDRGN
# reference files from the published sdists' test data, unpacked into the cache folder $2 (the tests find it
# through $FLEXPLUGIN_REFDATA, default .cache/refdata). Idempotent: a second run only checks what is there.
# Whatever cannot be set up is reported; the tests that need it skip locally and fail under CI=true.
set -euo pipefail
PY=${1:-.venv/bin/python}
CACHE=${2:-.cache/refdata}
mkdir -p "$CACHE"

# --- RELION 3.1 (CPU): relion_project and relion_reconstruct -----------------------------------------
if ! command -v relion_project >/dev/null 2>&1 || ! command -v relion_reconstruct >/dev/null 2>&1; then
  SUDO=
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; } && command -v apt-get >/dev/null 2>&1; then
    echo "test-setup: installing the distribution's relion (CPU) as an independent oracle"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq relion >/dev/null 2>&1 || \
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq relion >/dev/null 2>&1; } || true
  fi
  if command -v relion_project >/dev/null 2>&1 && command -v relion_reconstruct >/dev/null 2>&1; then
    echo "test-setup: relion installed"
  else
    echo "test-setup: relion_project/relion_reconstruct not available (install the 'relion' package as root);" \
         "the RELION oracle tests will be skipped (or fail under CI=true)"
  fi
fi

# --- Xvfb for the GUI tests (tests/gui/test_gui.py): Debian's xvfb, and x11-xkb-utils for its keymap ------------
if ! command -v Xvfb >/dev/null 2>&1 || ! command -v xkbcomp >/dev/null 2>&1; then
  SUDO=
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; } && command -v apt-get >/dev/null 2>&1; then
    echo "test-setup: installing xvfb and x11-xkb-utils for the headless GUI tests"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq xvfb x11-xkb-utils >/dev/null 2>&1 || \
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq xvfb x11-xkb-utils >/dev/null 2>&1; } || true
  fi
  missing_x=
  command -v Xvfb >/dev/null 2>&1 || missing_x="$missing_x Xvfb (package xvfb)"
  command -v xkbcomp >/dev/null 2>&1 || missing_x="$missing_x xkbcomp (package x11-xkb-utils)"
  if [ -z "$missing_x" ]; then
    echo "test-setup: Xvfb installed"
  else
    echo "test-setup: not available:$missing_x (install them as root); the GUI tests will be skipped" \
         "(or fail under CI=true)"
  fi
fi

# --- published sdists with reference test data -------------------------------------------------------
fetch_sdist() {  # name version marker-file → unpacked in $CACHE/name-version (kept only if marker exists)
  local name=$1 ver=$2 marker=$3 dest="$CACHE/$1-$2"
  [ -f "$dest/$marker" ] && return 0
  rm -rf "$dest" "$dest.part"
  local tmp; tmp=$(mktemp -d)
  if "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$name==$ver" >/dev/null 2>&1 \
     && mkdir -p "$dest.part" \
     && tar -xzf "$tmp"/*.tar.gz -C "$dest.part" --strip-components=1 \
     && [ -f "$dest.part/$marker" ]; then
    mv "$dest.part" "$dest"
    echo "test-setup: $name $ver sdist unpacked in $dest"
  else
    rm -rf "$dest.part"
    echo "test-setup: could not fetch $name==$ver sdist (or it lacks $marker); its reference tests will be" \
         "skipped (or fail under CI=true)"
  fi
  rm -rf "$tmp"
}
fetch_sdist cryojax 0.6.0 tests/data/cistem_projection.npz
fetch_sdist cryodrgn 4.3.1 tests/data/relion31.star
fetch_sdist mdanalysistests 2.11.0 MDAnalysisTests/data/adk_open.pdb
echo "test-setup: reference data in $CACHE"
