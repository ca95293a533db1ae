# Two commands do everything on a fresh machine:
#   make demo   - the main job: segment the bundled kidney sample with the shipped model
#   make test   - the whole test suite (GUI tests under a virtual X server)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/omniseg demo --out demo-output

test: setup
	OMP_NUM_THREADS=2 xvfb-run -a -s "-screen 0 1280x1024x24" $(PY) -m pytest -q -p no:cacheprovider
