# ace_lightning — every target is a one-liner over a package module. `make` lists them.
SHELL := /bin/bash
PY     := .venv/bin/python
STAMP  := .venv/.installed
CONCEPT ?=
KIND    ?=
NEUTRAL ?=
SYNONYMS ?=
MODEL   ?=
ARGS    ?=
SUITE   ?=
ADAPTER ?=
DEVICES ?= 1
OUT     ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow lint clean toyworld toyworld-eval bench compare bench-closed-form bench-gpu bench-full-size sweep

help: ## list every target
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package (idempotent)

train: $(STAMP) ## erase CONCEPT="a,b" (a preset or any phrase) [KIND=style] [NEUTRAL=..] [SYNONYMS="a,b"] [PRESERVE="a,@file"] [MODEL=dir-or-id] [ARGS="k=v ..."]
	@test -n "$(CONCEPT)" || { echo "usage: make train CONCEPT=<name>[,<name>...] [KIND=object|style|person|nsfw] [NEUTRAL=<phrase>] [SYNONYMS=\"a,b\"] [PRESERVE=\"a,@file\"] [MODEL=<dir-or-id>] [ARGS=\"k=v ...\"]"; exit 2; }
	$(PY) -m ace_lightning.train concept="$(CONCEPT)" $(if $(KIND),kind="$(KIND)") $(if $(NEUTRAL),neutral="$(NEUTRAL)") $(if $(SYNONYMS),'synonyms=[$(SYNONYMS)]') $(if $(PRESERVE),preserve="$(PRESERVE)") $(if $(MODEL),model.path="$(MODEL)") $(ARGS)

test: $(STAMP) ## run the default (fast, offline, CPU) test suite; lists its 15 slowest tests at the end
	$(PY) -m pytest -q --durations=15

test-slow: $(STAMP) ## run only the slow tests
	$(PY) -m pytest -q -m slow

lint: $(STAMP) ## ruff check
	$(PY) -m ruff check ace_lightning tests benchmarks

toyworld: $(STAMP) ## build (render, train, evaluate) the embedded ToyWorld model; resumable [ARGS="k=v ..."]
	$(PY) -m ace_lightning.toyworld.build $(ARGS)

toyworld-eval: $(STAMP) ## re-measure the shipped ToyWorld model's quality card
	$(PY) -m ace_lightning.toyworld.evaluate $(ARGS)

bench: $(STAMP) ## run a suite: SUITE=<name> [ADAPTER=path] [MODEL=dir-or-id] [DEVICES=N] [OUT=dir] [ARGS="k=v ..."]
	@test -n "$(SUITE)" || { echo "usage: make bench SUITE=<name> [ADAPTER=...] [MODEL=...] [DEVICES=N] [OUT=dir]"; exit 2; }
	$(PY) -m ace_lightning.bench.run suite="$(SUITE)" devices=$(DEVICES) $(if $(ADAPTER),adapter="$(ADAPTER)") $(if $(MODEL),model="$(MODEL)") $(if $(OUT),out="$(OUT)") $(ARGS)

compare: $(STAMP) ## methods side by side: SUITE=<name> CONCEPT=<c[,c2]> [METHODS=ace,esd_x,...] [MODEL=..] [DEVICES=N] [OUT=dir] [ARGS="train.k=v bench.k=v <method>.k=v"]
	@test -n "$(SUITE)" -a -n "$(CONCEPT)" || { echo "usage: make compare SUITE=<name> CONCEPT=<c[,c2]> [METHODS=a,b] [MODEL=...] [DEVICES=N] [OUT=dir] [ARGS=\"k=v ...\"]"; exit 2; }
	$(PY) -m ace_lightning.compare suite="$(SUITE)" concept="$(CONCEPT)" devices=$(DEVICES) $(if $(METHODS),methods="$(METHODS)") $(if $(MODEL),model="$(MODEL)") $(if $(OUT),out="$(OUT)") $(ARGS)

sweep: $(STAMP) ## hyperparameter sweep on a bench objective: SWEEP=experiments/sweeps/<name>.yaml [COUNT=n] [MODE=offline|online] [OUT=dir]
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=experiments/sweeps/<name>.yaml [COUNT=n] [MODE=offline|online] [OUT=dir]"; exit 2; }
	$(PY) -m ace_lightning.sweep sweep="$(SWEEP)" $(if $(COUNT),count=$(COUNT)) $(if $(MODE),mode=$(MODE)) $(if $(OUT),out="$(OUT)")

bench-closed-form: $(STAMP) ## time the closed-form stage for 1, 10, 100 concepts at SD-1.4 sizes [ARGS="--models sd14 sdxl --concepts ..."]
	$(PY) benchmarks/full_size_cost.py closed-form --models sd14 --concepts 1 10 100 $(ARGS)

bench-gpu: $(STAMP) ## ACE seconds per concept, peak CUDA memory, step time at SD-1.4 and SDXL size on one CUDA GPU (random weights) [ARGS="--models sd14 --tiny ..."]
	$(PY) benchmarks/bench_gpu.py $(ARGS)

bench-full-size: $(STAMP) ## CPU cost of one ACE step and of the closed form at SD-1.4 / SDXL size: ARGS="step ..." or ARGS="closed-form ..."
	$(PY) benchmarks/full_size_cost.py $(or $(ARGS),step)

clean: ## remove outputs, caches and the venv
	rm -rf .venv outputs wandb .pytest_cache .ruff_cache lightning_logs *.egg-info
