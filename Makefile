# The two commands of the README: `make demo` and `make test`.  Each sets up .venv first when it
# is missing or older than the files that define it (tools/setup_env.sh does the work).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mae-transfer-setup

.PHONY: setup demo test clean-venv

$(STAMP): pyproject.toml tools/setup_env.sh tools/fetch_sdist.py tools/detectron2_compat.py
	MAE_TRANSFER_VENV=$(abspath $(VENV)) bash tools/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mae-transfer demo

test: $(STAMP)
	$(PY) -m pytest tests

clean-venv:
	rm -rf $(VENV)
