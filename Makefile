# Two commands a user needs: `make demo` (set up + run the demo) and `make test` (set up + run the tests).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup browser demo test bench clean

# The whole environment is pinned in requirements.lock (pip freeze of a resolved install), so a fresh
# install is the same install. --no-deps: facenet-pytorch and basicsr-fixed declare stale pins we override.
$(BIN)/bfr-curate: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

setup: $(BIN)/bfr-curate

# The report and Prefect UI tests load pages in a real browser: Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

demo: setup
	$(BIN)/bfr-curate run catalogs/recipes/demo.yaml --out ./runs/demo

test: setup browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/degrade.py

clean:
	rm -rf $(VENV) runs
