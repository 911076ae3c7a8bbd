# The README's two commands: `make demo` (set-up + a short sine meta-training with an
# adaptation-curve plot) and `make test` (set-up + the test suite). Both create .venv if needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-slow setup clean-venv

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip uninstall -q -y metarl 2>/dev/null || true  # the old distribution name (PyPI's metarl is another project)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	.venv/bin/metarl train experiments/sine_quick.yaml --run-dir runs/demo --evaluate
	@echo "adaptation curve: runs/demo/eval/adaptation.png  (fits: runs/demo/eval/sine_fits.png)"

test: $(STAMP)
	$(PY) -m pytest -q

# the checks marked @pytest.mark.slow (full-length learning, fault-injection campaigns); .ci/slow runs this
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -s

clean-venv:
	rm -rf .venv
