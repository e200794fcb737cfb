# m2d: one command to set up and run the demo, one to set up and run the tests.
#
#   make demo    create .venv (when missing), install m2d with what the demo needs, run `m2d demo`
#   make test    create .venv (when missing), install m2d with the test extras, run `python -m pytest -q`
#
# Re-running is fast: each install is recorded in a stamp file in .venv and redone only when
# pyproject.toml (or the torch choice below) changes.
#
# torch is pinned to the CPU build this project is tested with. For a CUDA machine, choose the
# build and the index of your CUDA version, e.g.
#   make demo TORCH_SPEC='torch==2.13.0' TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#   make test TORCH_SPEC='torch>=2.4'          # any torch >= 2.4 from the default index
# Other variables: PYTHON (the interpreter that creates .venv), VENV (its folder),
# DEMO_ARGS (options of `m2d demo`, e.g. DEMO_ARGS='--data_dir my_clips --epochs 60'),
# PYTEST_ARGS (e.g. PYTEST_ARGS='-m "not slow"').

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
DEMO_ARGS ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet
TORCH_CHOICE := $(TORCH_SPEC)$(if $(TORCH_INDEX_URL), from $(TORCH_INDEX_URL))

.PHONY: help demo test install bench clean-venv FORCE

help:
	@echo 'make demo    set up .venv and run the demo (synthesize, pre-train, evaluate, report in demo_report/)'
	@echo 'make test    set up .venv and run the tests (python -m pytest -q)'
	@echo 'make install set up .venv with every extra (test, speech, demo) without running anything'
	@echo 'make bench   run the benchmarks in benchmarks/ (with the installed .venv)'
	@echo 'make clean-venv  remove .venv'
	@echo
	@echo 'variables:'
	@echo '  TORCH_SPEC=$(TORCH_SPEC)  the torch requirement installed first (CUDA: e.g. torch==2.13.0)'
	@echo '  TORCH_INDEX_URL=...  the index of that build, e.g. https://download.pytorch.org/whl/cu126'
	@echo '  PYTHON=$(PYTHON)  VENV=$(VENV)  DEMO_ARGS=...  PYTEST_ARGS=...'

demo: $(VENV)/.m2d-demo.stamp
	$(VENV)/bin/m2d demo $(DEMO_ARGS)

# pytest exits 5 when it collected no tests: a failure too, said by name.
test: $(VENV)/.m2d-test.stamp
	@$(PY) -c "import m2d, torch; print('m2d', m2d.__version__, 'torch', torch.__version__)"
	@status=0; $(PY) -m pytest -q $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo 'make test: pytest collected no tests' >&2; fi; exit $$status

install: $(VENV)/.m2d-test.stamp $(VENV)/.m2d-demo.stamp

bench: $(VENV)/.m2d-test.stamp
	$(PY) benchmarks/encode.py
	$(PY) benchmarks/convert.py
	$(PY) benchmarks/pretrain.py

clean-venv:
	rm -rf $(VENV)

$(PY):
	$(PYTHON) -m venv $(VENV)

# The torch build: installed again only when TORCH_SPEC / TORCH_INDEX_URL change (the stamp holds
# the choice and keeps its date otherwise, so the package stamps below stay up to date).
$(VENV)/.torch.stamp: FORCE | $(PY)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_CHOICE)" ]; then \
		echo "installing $(TORCH_CHOICE)"; \
		$(PIP) '$(TORCH_SPEC)' $(if $(TORCH_INDEX_URL),--index-url '$(TORCH_INDEX_URL)') \
			&& echo "$(TORCH_CHOICE)" > $@; \
	fi

$(VENV)/.m2d-test.stamp: pyproject.toml $(VENV)/.torch.stamp
	$(PIP) -e '.[test,speech,clap]'
	@touch $@

$(VENV)/.m2d-demo.stamp: pyproject.toml $(VENV)/.torch.stamp
	$(PIP) -e '.[demo]'
	@touch $@

FORCE:
