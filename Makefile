# nbdcache: `make run` serves a cached disk and boots a guest on it; `make test` runs every test.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-system-x86 \
	qemu-utils fio python3-venv python3-yaml busybox-static e2fsprogs zstd cpio fuse3 \
	gnutls-bin docker-compose
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench reliability docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "[setup] installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@test -x $(PY) || { echo "[setup] creating $(VENV) from /usr/bin/python3"; \
	  /usr/bin/python3 -m venv --system-site-packages $(VENV); }
	@echo "[setup] installing nbdcache (editable) with test extras"
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test,observe]'
	@touch $(STAMP)

run: setup
	@$(PY) -m nbdcache demo

test: setup
	@$(PY) -m pytest -q

test-fast: setup
	@$(PY) -m pytest -q -m "not slow"

reliability: setup
	@$(PY) -m pytest tests/reliability --long -q

bench: setup
	@$(PY) bench/run.py --guest

docs: setup
	@$(PY) -m nbdcache tunables --markdown > docs/tunables.md
	@$(PY) -m nbdcache stats --markdown > docs/statistics.md

clean:
	rm -rf var/ .pytest_cache .hypothesis
