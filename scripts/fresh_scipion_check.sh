#!/usr/bin/env bash
# Follows the README tutorial's install route on a fresh machine and runs the tutorial at test size:
# a new venv with scipion-app from PyPI, `scipion installp --devel` of this checkout, `scipion config`, the
# protocol list, then `scipion python -m flexplugin.tutorial --preset tiny` (≈1 min on 2 CPU cores).
# Not part of `make test` (it downloads scipion-app and its Qt dependencies); run it before a release:
#   bash scripts/fresh_scipion_check.sh [work folder, default /tmp/flexplugin_fresh_scipion]
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/flexplugin_fresh_scipion}
rm -rf "$WORK" && mkdir -p "$WORK"
export SCIPION_HOME="$WORK/scipion_home" SCIPION_USER_DATA="$WORK/ScipionUserData"
mkdir -p "$SCIPION_HOME" "$SCIPION_USER_DATA"
python3 -m venv "$WORK/scipion3"
# shellcheck disable=SC1091
source "$WORK/scipion3/bin/activate"
pip install -q scipion-app "torch==${TORCH_VERSION:-2.13.0}"
# scipion-app 3.8.3's launcher needs `import importlib.util` on Python >= 3.11 (README, Installation)
scipion() { python -c 'import importlib.util, sys; from scipion.__main__ import main; sys.argv[0] = "scipion"; sys.exit(main())' "$@"; }
git clone -q "$SRC" "$WORK/scipion-em-flexplugin"   # the folder name must be the plugin's pip name
printf '\n\n\n' | scipion config >/dev/null
# installp prints "File or folder ... not found" with pip's new-style editable installs; the install is fine
scipion installp -p "$WORK/scipion-em-flexplugin" --devel >/dev/null 2>&1 || true
n=$(scipion protocols 2>/dev/null | grep -c "^flexplugin ")
echo "fresh-scipion: scipion lists $n flexplugin protocols"
[ "$n" -ge 8 ] || { echo "fresh-scipion: expected at least 8"; exit 1; }
scipion python -m flexplugin.tutorial --preset tiny --project flexplugin_tutorial_check
echo "fresh-scipion: OK — open the project with: SCIPION_HOME=$SCIPION_HOME SCIPION_USER_DATA=$SCIPION_USER_DATA" \
     "scipion project flexplugin_tutorial_check"
