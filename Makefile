# Every target creates .venv on first use: torch first, pinned to the CPU build (a looser spec pulls CUDA wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OLDEST := $(VENV)/oldest
# The oldest versions ilora claims (pyproject lower bounds), tested as an overlay on top of the newest install.
OLDEST_PINS := peft==0.15.2 transformers==5.17.0 huggingface-hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 certifi==2026.10.18

.PHONY: install demo test test-oldest lint bench quickstart transfer clean

$(STAMP): pyproject.toml examples/crabplus/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[triton,crabplus,dev]" -e examples/crabplus
	# DeepSpeed builds against the torch above: without build isolation, or pip would fetch another (CUDA) torch.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation wheel deepspeed==0.19.8
	# The mixlora package is a benchmark alternative; its own pins (old torch, peft) would clash, so no deps.
	$(BIN)/pip install -q --no-deps mixlora==0.2.3
	rm -rf $(OLDEST) && $(BIN)/pip install -q --no-deps --target $(OLDEST) $(OLDEST_PINS)
	touch $@

install: $(STAMP)

# The main job: the Crab+ recipe on its small built-in default (synthetic AV-UIE v2 data, tiny model, CPU).
demo: $(STAMP)
	$(BIN)/crabplus demo --config examples/crabplus/configs/tiny.yaml --out runs/demo

# The whole suite on the newest dependencies, then the library's tests on the oldest supported ones.
# pytest's exit status 5 (nothing collected) is turned into an explicit failure.
run_pytest = $(1) $(BIN)/pytest -q $(2); s=$$?; if [ $$s -eq 5 ]; then echo "pytest collected no tests" >&2; s=1; fi; exit $$s

test: $(STAMP)
	$(call run_pytest,,)
	$(MAKE) --no-print-directory test-oldest

test-oldest: $(STAMP)
	$(call run_pytest,PYTHONPATH=$(OLDEST),-p no:cacheprovider tests/ilora)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Quick CPU subset, layer and model level (~3 minutes on 2 quiet cores); writes to the ignored benchmarks/out/.
# To keep a record: the same commands with --record (benchmarks/results/, never overwritten), then commit it.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick
	$(BIN)/python -m benchmarks.model_step --quick

quickstart: $(STAMP)
	$(BIN)/python examples/tiny_causal_lm.py

transfer: $(STAMP)
	$(BIN)/crabplus transfer --config examples/crabplus/configs/transfer_tiny.yaml --out runs/transfer

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
