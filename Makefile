# `make demo` and `make test` set everything up themselves: a .venv with pinned dependencies and this package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= data/default
DEMO_RUN ?= runs/demo

.PHONY: install test demo clean

install: $(STAMP)

# torch is installed first and pinned, so nothing can pull a CUDA build in its place.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,hf,serve]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	@test -f $(DATA)/metadata.json || $(BIN)/ponderlm data prepare --out $(DATA)
	@if [ -f $(DEMO_RUN)/config.yaml ]; then \
		$(BIN)/ponderlm train --out $(DEMO_RUN) --resume; \
	else \
		$(BIN)/ponderlm train small --out $(DEMO_RUN) --set data.path=$(DATA); \
	fi
	$(BIN)/ponderlm eval $(DEMO_RUN) --split test --max-tokens 65536 > $(DEMO_RUN)/eval_test.json
	@cat $(DEMO_RUN)/eval_test.json
	$(BIN)/ponderlm eval $(DEMO_RUN) --split test --max-tokens 16384 --taus 0.0001,0.05,0.3,0.99 > $(DEMO_RUN)/tau_table.md
	@cat $(DEMO_RUN)/tau_table.md
	@echo "run directory: $(DEMO_RUN)  (metrics: $(DEMO_RUN)/metrics.jsonl, eval report: $(DEMO_RUN)/eval_test.json," \
		"tau trade-off: $(DEMO_RUN)/tau_table.md)"

clean:
	rm -rf $(VENV) $(DEMO_RUN)
