# tollwatch — every target bootstraps what it needs from nothing (python3, node/npm on PATH).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE_DIR ?= .tollwatch
ENGINE ?= $(or $(TOLLWATCH_ENGINE),local)
JARS := .jars
JARS_STAMP := $(JARS)/.fetched

.PHONY: demo test unit faults fuzz lint bootstrap jars up down status bench clean

## demo: set everything up, start the local stack and ingest the sample through a Prefect flow run
## (ENGINE=spark: the merge runs in Spark, spark-submit of the wheel's tollwatch-merge on local[*])
demo: bootstrap
	TOLLWATCH_ENGINE=$(ENGINE) TOLLWATCH_SPARK_JARS_DIR=$(CURDIR)/$(JARS) $(BIN)/tollwatch demo --state-dir $(STATE_DIR)

## test: set everything up, check the code (ruff lint + format) and run the whole test suite against real local
## services (this is what CI runs: .ci/run)
test: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

## unit: only the unit layer (tests/unit/: no services, in-memory fakes of the core's ports; under 30 s; also part
## of `make test`)
unit: bootstrap
	$(BIN)/python -m pytest tests/unit

## fuzz: every boundary's fuzzers with many examples (HYPOTHESIS_PROFILE=fuzz; `make test` runs them bounded)
fuzz: bootstrap
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -m fuzz tests/unit

## faults: only the fault suite (tests/faults/, ~4 min; it is also part of `make test`)
faults: bootstrap
	$(BIN)/python -m pytest tests/faults

## bench: every benchmark figure beside its same-run baseline (~14 min on 2 cores; not part of the tests)
bench: bootstrap
	$(BIN)/python -m bench

## lint: ruff over the code
lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## bootstrap: virtualenv with pinned dependencies + Azurite from npm + the Spark engine's jars from Maven Central
## (idempotent, fast when up to date)
bootstrap: $(STAMP) node_modules/.package-lock.json $(JARS_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

node_modules/.package-lock.json: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error

## jars: Iceberg's Spark runtime and the SQLite JDBC driver (jvm/pom.xml pins them) into .jars/, for the spark engine
jars: $(JARS_STAMP)

$(JARS_STAMP): jvm/pom.xml
	rm -rf $(JARS)
	mvn -B -q --no-transfer-progress -f jvm/pom.xml dependency:copy-dependencies -DoutputDirectory="$(CURDIR)/$(JARS)"
	touch $@

up: bootstrap
	$(BIN)/tollwatch stack up --state-dir $(STATE_DIR)

down:
	@test -x $(BIN)/tollwatch && $(BIN)/tollwatch stack down --state-dir $(STATE_DIR) || true

status: bootstrap
	$(BIN)/tollwatch stack status --state-dir $(STATE_DIR)

clean: down
	rm -rf $(VENV) node_modules $(STATE_DIR) $(JARS)
