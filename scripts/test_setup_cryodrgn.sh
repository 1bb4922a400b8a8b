#!/usr/bin/env bash
# The real-plugin chain of tests/scipion/test_chain_cryodrgn.py (docs/ecosystem.md): scipion-em-cryodrgn 3.13.1
# and the scipion-em-relion it imports (relion.convert writes cryoDRGN's input STAR) go into the project venv, as
# Scipion plugins; cryoDRGN 4.3.1 goes into its own venv, $2/cryodrgn-4.3.1-venv, which the test hands to the
# plugin through its variable CRYODRGN_ENV_ACTIVATION (". <venv>/bin/activate").
# The cryoDRGN venv is made from the project venv's base interpreter, and a .pth file puts the project venv's
# site-packages after its own, so torch, numpy, scipy, pandas, matplotlib and starfile are shared, never
# downloaded twice (cryodrgn's own requirements would pull a second, CUDA, torch and jupyterlab). cryodrgn is
# installed with --no-deps beside, pinned and --no-deps too, exactly what the `cryodrgn` console script imports
# (it imports all of its commands before it parses its arguments): checked below by `cryodrgn --version`.
# Idempotent: a stamp records what was installed; a second run only compares it. Whatever fails is reported and
# the chain test skips locally (fails under CI=true).
set -euo pipefail
PY=${1:-.venv/bin/python}
CACHE=${2:-.cache/refdata}
mkdir -p "$CACHE"
quiet() { grep -v "is ignored: it is neither" || true; }

# --- the Scipion plugins, in the project venv ----------------------------------------------------------------
PLUGINS="scipion-em-cryodrgn==3.13.1 scipion-em-relion==5.0.2 emtools==0.1.0 xmltodict==1.0.4"
have_plugins() {
  "$PY" - "$PLUGINS" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1].split())))
EOF
}
if ! have_plugins; then
  # shellcheck disable=SC2086
  if "$PY" -m pip install -q --disable-pip-version-check --no-deps $PLUGINS 2>&1 | quiet && have_plugins; then
    echo "test-setup: Scipion plugins installed in the project venv: $PLUGINS"
  else
    echo "test-setup: could not install $PLUGINS; the cryoDRGN chain test will be skipped (or fail under CI=true)"
  fi
fi

# --- cryoDRGN 4.3.1 in its own venv ------------------------------------------------------------------------------
VENV="$CACHE/cryodrgn-4.3.1-venv"
DRGN="cryodrgn==4.3.1
pyyaml==6.0.4 igraph==1.0.0 texttable==1.7.2
seaborn==0.13.2 scikit-learn==1.9.1 joblib==1.6.0 threadpoolctl==3.8.0 narwhals==2.29.0 cloudpickle==3.1.3
nbformat==5.11.1 traitlets==5.16.1 fastjsonschema==2.22.3 jsonschema==4.26.0 attrs==26.1.0 referencing==0.37.0
rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
umap-learn==0.5.12 numba==0.68.1 llvmlite==0.50.0 pynndescent==0.7.0 tqdm==4.70.1
flask==3.1.3 werkzeug==3.1.9 itsdangerous==2.2.0 click==8.5.1 blinker==1.9.0 plotly==6.9.0"
SITES=$("$PY" -c "import sysconfig; p = sysconfig.get_paths(); print('\n'.join(sorted({p['purelib'], p['platlib']})))")
BASE=$("$PY" -c "import sys; print(getattr(sys, '_base_executable', '') or sys.executable)")
WANT=$(printf '%s\n%s\n%s\n' "$DRGN" "$SITES" "$("$BASE" --version 2>&1)")
STAMP="$VENV/flexplugin-setup.txt"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/cryodrgn" ]; then
  exit 0
fi
t0=$(date +%s)
rm -rf "$VENV"
ok=1
"$BASE" -m venv "$VENV" || ok=0
if [ $ok = 1 ]; then
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  printf '%s\n' "$SITES" > "$SITE/zz_flexplugin_project_venv.pth"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps $DRGN 2>&1 | quiet || ok=0
  # the console script as the plugin calls it; it imports every command (and compiles numba's caches once)
  [ $ok = 1 ] && { version=$("$VENV/bin/cryodrgn" --version 2>&1 | tail -1) || ok=0; }
fi
if [ $ok = 1 ] && [ "$version" = "cryoDRGN 4.3.1" ]; then
  printf '%s' "$WANT" > "$STAMP"
  echo "test-setup: $version in $VENV ($(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1))"
else
  echo "test-setup: could not set up cryoDRGN 4.3.1 in $VENV (${version:-venv failed});" \
       "the cryoDRGN chain test will be skipped (or fail under CI=true)"
fi
