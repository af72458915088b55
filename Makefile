# skincancer: `make demo` (set up, then train + evaluate on ISIC 2017), `make test` (set up, then the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/isic2017
RUN ?= runs/demo
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint benchmark-accuracy benchmark-ensemble clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds on this machine's disk (see README)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/skincancer index $(DATA)/train -o $(RUN)/data/train.csv \
		--metadata $(DATA)/ISIC-2017_Training_Data_metadata.csv
	$(BIN)/skincancer index $(DATA)/valid -o $(RUN)/data/valid.csv \
		--metadata $(DATA)/ISIC-2017_Validation_Data_metadata.csv
	$(BIN)/skincancer index --isic-csv $(DATA)/ISIC-2017_Test_v2_Part3_GroundTruth.csv --images $(DATA)/test \
		-o $(RUN)/data/test.csv
	$(BIN)/skincancer train --config configs/linear.yaml --train $(RUN)/data/train.csv \
		--valid $(RUN)/data/valid.csv --out $(RUN)
	$(BIN)/skincancer evaluate --model $(RUN) --data $(RUN)/data/test.csv --out $(RUN)/test

# The headline fine-tuned model (configs/isic2017.yaml), evaluated once on the test split.
benchmark-accuracy: setup
	$(BIN)/skincancer index $(DATA)/train -o runs/benchmark/data/train.csv
	$(BIN)/skincancer index $(DATA)/valid -o runs/benchmark/data/valid.csv
	$(BIN)/skincancer index --isic-csv $(DATA)/ISIC-2017_Test_v2_Part3_GroundTruth.csv --images $(DATA)/test \
		-o runs/benchmark/data/test.csv
	$(BIN)/skincancer train --config configs/isic2017.yaml --train runs/benchmark/data/train.csv \
		--valid runs/benchmark/data/valid.csv --out runs/benchmark
	$(BIN)/skincancer evaluate --model runs/benchmark --data runs/benchmark/data/test.csv --out runs/benchmark/test

# A second member (EfficientNet-Lite2, same recipe) and the ensemble of the two, evaluated on the test split.
# Reuses runs/benchmark when it exists (otherwise trains it first).
benchmark-ensemble: setup
	test -f runs/benchmark/model/model.json || $(MAKE) benchmark-accuracy
	$(BIN)/skincancer train --config configs/isic2017.yaml --backbone tf_efficientnet_lite2 \
		--train runs/benchmark/data/train.csv --valid runs/benchmark/data/valid.csv --out runs/benchmark-lite2
	$(BIN)/skincancer evaluate --model runs/benchmark-lite2 --data runs/benchmark/data/test.csv \
		--out runs/benchmark-lite2/test
	$(BIN)/skincancer evaluate --model runs/benchmark --model runs/benchmark-lite2 \
		--data runs/benchmark/data/test.csv --out runs/benchmark-ensemble/test

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs/demo
