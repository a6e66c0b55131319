# Two entry points: `make demo` trains the quickstart recipe on the bundled sample data,
# `make test` runs the test suite. Both install into a local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE_DIR ?= data/sample
SIMPLE_DIR ?= data/sample-simple

.PHONY: install demo sample downstream test clean

# fusionlab with its test tools, and the example plugin that the tests exercise beside it.
$(BIN)/fusionlab: pyproject.toml plugins/fusionlab-xattn/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]" -e plugins/fusionlab-xattn
	touch $(BIN)/fusionlab

install: $(BIN)/fusionlab

# The rich scenes (3x3 grid, colours, sizes) for comparisons and scaling studies, and the simple
# ones (2x2 grid, white digits) that the quickstart learns to read within minutes on a CPU.
# A change to the builder rebuilds them.
BUILDER := fusionlab/data/build.py fusionlab/data/scenes.py fusionlab/data/questions.py

$(SAMPLE_DIR)/manifest.json: $(BUILDER) | install
	$(BIN)/fusionlab data sample --out $(SAMPLE_DIR) --overwrite

$(SIMPLE_DIR)/manifest.json: $(BUILDER) | install
	$(BIN)/fusionlab data sample --out $(SIMPLE_DIR) --variant simple --overwrite

sample: $(SAMPLE_DIR)/manifest.json $(SIMPLE_DIR)/manifest.json

demo: sample
	$(BIN)/fusionlab fit --config recipes/quickstart.yaml

# The paper's downstream protocol at small scale: pretrain early fusion, late fusion and MoE at about
# the same training FLOPs, then fine-tune each for question answering and score it (about 40 minutes).
DOWNSTREAM := runs/downstream
PRETRAINED := $(foreach model,early late moe,$(DOWNSTREAM)/$(model)/version_0/checkpoints/last.ckpt)

$(DOWNSTREAM)/%/version_0/checkpoints/last.ckpt: | sample
	$(BIN)/fusionlab fit --config recipes/quickstart.yaml --config recipes/downstream/$*.yaml \
	  --trainer.logger.init_args.version 0

downstream: $(PRETRAINED)
	$(BIN)/fusionlab downstream --recipe recipes/sft_qa.yaml --out $(DOWNSTREAM)/sft \
	  $(foreach model,early late moe,--checkpoint $(model)=$(DOWNSTREAM)/$(model)/version_0/checkpoints/last.ckpt)

# The package's tests and the example plugin's own tests, in one pytest run.
test: install
	$(BIN)/python -m pytest -q tests plugins/fusionlab-xattn/tests

clean:
	rm -rf runs $(SAMPLE_DIR) $(SIMPLE_DIR)
