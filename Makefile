# Two commands on a fresh machine: `make demo` and `make test` (see README).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.flexplugin-installed
# the tested torch; on Linux without CUDA wheels around, pip's normal rules pick what the index offers
TORCH   ?= torch==2.13.0
DEMO    ?= demo_output
REFDATA ?= .cache/refdata

.PHONY: install demo test test-setup clean

$(STAMP): setup.py requirements-test.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e . -r requirements-test.txt
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(PY) $(DEMO)

# reference programs and data for the independent-oracle tests (RELION 3.1 CPU, cisTEM/cryoDRGN test data);
# scipion-em-cryodrgn in the project venv and cryoDRGN 4.3.1 in its own venv for the real-plugin chain test
test-setup: $(STAMP)
	bash scripts/test_setup.sh $(PY) $(REFDATA)
	bash scripts/test_setup_cryodrgn.sh $(PY) $(REFDATA)

# two workers (pytest-xdist), one thread each: CI has 2 cores; a test file stays in one worker (its fixtures,
# Scipion projects and module set-up are shared by its tests)
WORKERS ?= 2
test: test-setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	OMP_NUM_THREADS=1 FLEXPLUGIN_REFDATA=$(abspath $(REFDATA)) $(PY) -m pytest -q -p no:cacheprovider \
	  -n $(WORKERS) --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) $(DEMO) .cache
