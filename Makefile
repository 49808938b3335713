# The two commands of the README. Both create .venv and install what they need (CPU torch).
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# CPU torch: requirements/cpu.txt pins torch==X+cpu. PyPI has no +cpu builds, so where pip's own sources
# (pip.conf, PIP_* variables, a local wheel folder) lack that wheel, the probe adds PyTorch's CPU index if it
# answers within a few seconds (requirements/README.md). Computed when the install recipe runs, after the venv.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX = $(shell $(PY) requirements/torch_index.py $(PIP) $(TORCH_CPU_INDEX))
INSTALL = $(strip $(PIP) install --quiet --disable-pip-version-check -c requirements/cpu.txt $(TORCH_INDEX))

.PHONY: serve test install install-test bench grpc-stubs

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

install: $(VENV)/bin/python
	$(INSTALL) -e .

install-test: $(VENV)/bin/python
	$(INSTALL) -e '.[test]'
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk >/dev/null) \
	  || (echo "the benchmark smoke test needs wrk: apt-get install wrk" && exit 1)

serve: install   ## start the server on the shipped weights (http://127.0.0.1:8000)
	$(VENV)/bin/simplenn-serve

test: install-test   ## run every test, on two workers (tests/conftest.py says how files are shared out)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: install-test   ## the side-by-side benchmark, HTTP and gRPC (not part of the tests)
	@command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null) \
	  || (echo "the gRPC benchmark needs h2load: apt-get install nghttp2-client" && exit 1)
	$(VENV)/bin/python bench/run.py --grpc

grpc-stubs: install-test   ## regenerate serve/grpc_gen's stubs from its .proto files (checked in)
	$(VENV)/bin/python -m serve.grpc_gen.generate
