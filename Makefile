# make run   installs what the node needs and starts it: CPU, ONNX Runtime, the bundled demo model.
# make test  installs what the tests need (Python packages; dcmtk, Orthanc, dicom3tools when
#            root) and runs them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?=

.PHONY: run test install install-dev peers models export-models clean

# The host kernels are compiled at install: a change to their sources reinstalls.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard kernels/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/appliance serve $(if $(CONFIG),--config $(CONFIG))

# Real peers for the tests: dcmtk (storescu/echoscu, the sending scanner), Orthanc (the PACS),
# dicom3tools (dciodvfy). Installed from Debian when missing and we are root.
peers:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "not root: tests that need$$missing will skip"; fi; \
	fi

test: install-dev peers
	$(PY) -m pytest -q

# Rebuild the demo model package: train it (deterministic, ~12 minutes on 2 cores), then the
# toolchain exports it (`appliance export`: ONNX, parity against PyTorch, hashes, device UID).
models: install-dev
	$(PY) -m export.train_cxr_triage

# Re-export the shipped package from its weights through the toolchain only (seconds); the result
# is byte-identical to what ships.
export-models: install-dev
	$(VENV)/bin/appliance export appliance/model_packages/cxr-triage

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
