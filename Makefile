# `make demo` and `make test` set everything up themselves: a .venv with pinned dependencies and this package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= data/default
DEMO_RUN ?= runs/demo

.PHONY: install test demo demo-train demo-small clean

install: $(STAMP)

# torch is installed first and pinned, so nothing can pull a CUDA build in its place.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,hf,serve]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# A PonderLM-3 and a vanilla model on the same tokens (the `demo` preset), then what PonderLM-3 is about: the tau
# trade-off with measured tokens/s, which tokens ponder (analyze's page), and a generated sample with its steps.
demo: $(STAMP)
	@test -f $(DATA)/metadata.json || $(BIN)/ponderlm data prepare --out $(DATA)
	@$(MAKE) --no-print-directory demo-train RUN=$(DEMO_RUN) SET="--set data.path=$(DATA)"
	@$(MAKE) --no-print-directory demo-train RUN=$(DEMO_RUN)-vanilla SET="--set data.path=$(DATA) --set method=vanilla"
	$(BIN)/ponderlm eval $(DEMO_RUN) --split test --max-tokens 8192 > $(DEMO_RUN)/eval_test.json
	$(BIN)/ponderlm eval $(DEMO_RUN)-vanilla --split test --max-tokens 8192 > $(DEMO_RUN)-vanilla/eval_test.json
	$(BIN)/ponderlm eval $(DEMO_RUN) --split test --max-tokens 8192 --taus 0,0.0001,0.001,0.01,0.05,0.3 \
		> $(DEMO_RUN)/tau_table.md
	@cat $(DEMO_RUN)/tau_table.md
	$(BIN)/ponderlm analyze $(DEMO_RUN) --max-tokens 4096 > /dev/null
	$(BIN)/ponderlm generate $(DEMO_RUN) --prompt "The King" --max-new-tokens 32 --temperature 0.8 --top-k 40 \
		--tau 0.001 --show-steps
	@$(BIN)/python -m ponderlm.demo $(DEMO_RUN) $(DEMO_RUN)-vanilla

# Train RUN from PRESET, or resume it if it exists (a finished run only re-evaluates).
PRESET ?= demo
demo-train:
	@if [ -f $(RUN)/config.yaml ]; then $(BIN)/ponderlm train --out $(RUN) --resume; \
	else $(BIN)/ponderlm train $(PRESET) --out $(RUN) $(SET); fi

# The demo of earlier versions: PonderLM-3 at the `small` shape, ~46 min in fp32 on 2 AVX2 cores (~11 with bf16).
demo-small: $(STAMP)
	@test -f $(DATA)/metadata.json || $(BIN)/ponderlm data prepare --out $(DATA)
	@$(MAKE) --no-print-directory demo-train RUN=runs/demo-small PRESET=small SET="--set data.path=$(DATA)"
	$(BIN)/ponderlm eval runs/demo-small --split test --max-tokens 65536 > runs/demo-small/eval_test.json
	@cat runs/demo-small/eval_test.json
	$(BIN)/ponderlm eval runs/demo-small --split test --max-tokens 16384 --taus 0.0001,0.05,0.3,0.99

clean:
	rm -rf $(VENV) $(DEMO_RUN) $(DEMO_RUN)-vanilla runs/demo-small
