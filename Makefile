# tagi-ds developer entry points. Each target is also spelled out in README.md.
PYTHON ?= python
TORCH ?= torch==2.13.0
# CPU CI uses the local CPU wheel; on a GPU machine install your CUDA torch first and run `make install TORCH=`.
INSTALL = $(PYTHON) -m pip install $(TORCH) -e ".[test]"

.PHONY: install quickstart test test-fast bench style reproduce tested

install:
	$(INSTALL)

quickstart:  ## all stages + evaluation on the embedded default, 2 CPU ranks
	$(INSTALL) && bash launchers/quickstart.sh

test:  ## the whole suite (README's test command; .ci/run runs exactly this)
	$(INSTALL) && $(PYTHON) -m pytest -q -n 2 --dist worksteal

test-fast:  ## everything but the multi-process tests
	$(PYTHON) -m pytest -q -m "not distributed"

bench:  ## kernel, train-step, inference-cost and plan-memory benchmarks (results in benchmarks/results/)
	$(PYTHON) benchmarks/bench_lora_kernel.py
	$(PYTHON) benchmarks/bench_train_step.py
	$(PYTHON) benchmarks/bench_inference_cost.py
	$(PYTHON) benchmarks/bench_plan_memory.py

STYLE_PATHS = tagi_ds kernels launchers benchmarks tests scripts

style:  ## lint and formatting (ruff check, ruff format --check; settings in pyproject.toml)
	ruff check $(STYLE_PATHS)
	ruff format --check $(STYLE_PATHS)

reproduce:  ## the miniature TAGI reproduction -> docs/results.md (<= 45 min on 2 CPU cores)
	$(PYTHON) -m pip install -e ".[test,plot]" && bash scripts/reproduce.sh

tested:  ## after the suite passed: record this environment's versions in requirements/tested.txt (a constraints file)
	{ echo "# Versions the whole test suite last passed with (a constraints file: pip install torch==2.13.0 -e \".[test]\" -c requirements/tested.txt)."; \
	  echo "# Regenerate from the environment that passed: make tested. Last: $$(date +%F), $$($(PYTHON) -c 'import platform; print("CPython", platform.python_version())'), CPU torch."; \
	  $(PYTHON) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements/tested.txt
