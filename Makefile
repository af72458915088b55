# skincancer: `make demo` (set up, then train + evaluate on ISIC 2017), `make test` (set up, then the whole test suite),
# `make test-fast` (the suite without the tests marked slow: the inner loop).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/isic2017
RUN ?= runs/demo
RUN_DATA = $(RUN)-data# the manifests; beside the run, since train never writes a run into a folder holding other files
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint benchmark-accuracy clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds on this machine's disk (see README)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/skincancer index $(DATA)/train --source isic2017 -o $(RUN_DATA)/train.csv \
		--metadata $(DATA)/ISIC-2017_Training_Data_metadata.csv
	$(BIN)/skincancer index $(DATA)/valid --source isic2017 -o $(RUN_DATA)/valid.csv \
		--metadata $(DATA)/ISIC-2017_Validation_Data_metadata.csv
	$(BIN)/skincancer index --isic-csv $(DATA)/ISIC-2017_Test_v2_Part3_GroundTruth.csv --images $(DATA)/test \
		-o $(RUN_DATA)/test.csv
	$(BIN)/skincancer train --config configs/linear.yaml --overwrite --train $(RUN_DATA)/train.csv \
		--valid $(RUN_DATA)/valid.csv --out $(RUN)
	$(BIN)/skincancer evaluate --model $(RUN) --data $(RUN_DATA)/test.csv --out $(RUN)/test

# The headline model of issue 3: an ensemble of the linear probe (configs/linear.yaml) and two fine-tunes
# (configs/isic2017.yaml: Lite0; configs/isic2017-lite2.yaml: Lite2), each member and the ensemble evaluated once on
# the test split: runs/benchmark/<member>/test/ and runs/benchmark/test/metrics.json. Then its fast student
# (runs/benchmark/student, float and int8), distilled from it (`serve` serves the ensemble: the student is less
# accurate). On the 2-core host: 99 minutes of training for the members, 5 for their exports and evaluations, 18
# for the student (its targets, exports and evaluations included; BENCHMARKS.md). The evaluations run on ONNX
# Runtime (each export is checked against PyTorch): the same figures to 4 decimals as eager PyTorch, about 3x faster.
BENCH := runs/benchmark
# A member an earlier `make benchmark-accuracy` started is resumed from its last epoch (a finished one is kept as it
# is); FRESH=1 trains every member afresh (after a change to its config or the code).
member = if [ -z "$(FRESH)" ] && [ -f $(2)/config.yaml ]; then $(BIN)/skincancer train --resume $(2); \
	else $(BIN)/skincancer $(or $(3),train) --config $(1) --overwrite --train $(BENCH)/data/train.csv \
	--valid $(BENCH)/data/valid.csv --out $(2); fi
MEMBERS := $(BENCH)/lite0 $(BENCH)/lite2 $(BENCH)/linear
TEACHERS := $(foreach run,$(MEMBERS),--teacher $(run))
benchmark-accuracy: setup
	$(BIN)/skincancer index $(DATA)/train --source isic2017 -o $(BENCH)/data/train.csv \
		--metadata $(DATA)/ISIC-2017_Training_Data_metadata.csv
	$(BIN)/skincancer index $(DATA)/valid --source isic2017 -o $(BENCH)/data/valid.csv \
		--metadata $(DATA)/ISIC-2017_Validation_Data_metadata.csv
	$(BIN)/skincancer index --isic-csv $(DATA)/ISIC-2017_Test_v2_Part3_GroundTruth.csv --images $(DATA)/test \
		-o $(BENCH)/data/test.csv
	$(call member,configs/isic2017.yaml,$(BENCH)/lite0)
	$(call member,configs/isic2017-lite2.yaml,$(BENCH)/lite2)
	$(call member,configs/linear.yaml,$(BENCH)/linear)
	for run in $(MEMBERS); do $(BIN)/skincancer export --model $$run || exit 1; done
	for run in $(MEMBERS); do $(BIN)/skincancer evaluate --model $$run --data $(BENCH)/data/test.csv \
		--out $$run/test --engine onnx || exit 1; done
	$(BIN)/skincancer evaluate $(foreach run,$(MEMBERS),--model $(run)) --data $(BENCH)/data/test.csv \
		--out $(BENCH)/test --engine onnx
	# the fast model (issue 24): one Lite0 distilled from the ensemble (configs/student.yaml), exported to ONNX and
	# int8 (calibrated on training images, checked on validation ones), each evaluated once on the test split
	$(call member,configs/student.yaml,$(BENCH)/student,distill $(TEACHERS))
	$(BIN)/skincancer export --model $(BENCH)/student
	$(BIN)/skincancer evaluate --model $(BENCH)/student --data $(BENCH)/data/test.csv --out $(BENCH)/student/test \
		--engine onnx
	$(BIN)/skincancer export --model $(BENCH)/student --int8
	$(BIN)/skincancer evaluate --model $(BENCH)/student --data $(BENCH)/data/test.csv \
		--out $(BENCH)/student/test-int8 --engine int8

# one pytest-xdist worker per core (two on the 2-core machine; one torch thread each, tests/conftest.py); the Ray
# tests share one worker (--dist loadgroup)
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup
test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs/demo runs/demo-data
