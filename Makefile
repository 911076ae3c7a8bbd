# The README's two commands: `make demo` (set-up + a short sine meta-training with an
# adaptation-curve plot) and `make test` (set-up + the test suite). Both create .venv if needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test test-mw test-slow setup clean-venv

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
	$(MAKE) test-mw

# The Meta-World pass: .venv-mw sees .venv's packages (a .pth line) and adds metaworld, which brings
# its pinned mujoco 3.3.0 (shadowing .venv's 4.x); it runs the Meta-World tests and, under that
# mujoco, the MuJoCo env and collector tests (the fast-path checks skip: no mujoco.batch in 3.x).
MW_PY := .venv-mw/bin/python
MW_STAMP := .venv-mw/.installed
MW_TESTS := tests/test_metaworld.py tests/test_envs.py tests/test_rollouts.py

$(MW_STAMP): $(STAMP)
	test -x $(MW_PY) || python3 -m venv .venv-mw
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$$($(MW_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/main-venv.pth"
	echo 'torch==2.13.0' > .venv-mw/constraints.txt
	$(MW_PY) -m pip install -q -c .venv-mw/constraints.txt 'metaworld==3.1.1'
	$(MW_PY) -m pip install -q --no-deps -e .
	touch $(MW_STAMP)

test-mw: $(MW_STAMP)
	$(MW_PY) -m pytest -q -p no:cacheprovider $(MW_TESTS)

# the checks marked @pytest.mark.slow (full-length learning, fault-injection campaigns); .ci/slow runs this
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -s

clean-venv:
	rm -rf .venv .venv-mw
