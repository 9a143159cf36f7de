# Static checks of the Python code: mypy (settings in cloudlet_pkg/pyproject.toml [tool.mypy]) on the
# cloudlet package, ruff (settings in ruff.toml) on the package and the tests. Included by the top
# Makefile (PY is the virtualenv's python). Both tools run even when the first one fails, so one run
# lists every finding.

.PHONY: lint-python

lint-python: ## Python: mypy --strict on the cloudlet package, ruff check on it and tests/ (~2 s warm, ~45 s cold)
	rc=0; \
	$(PY) -m mypy --config-file cloudlet_pkg/pyproject.toml cloudlet_pkg/src/cloudlet bench_pkg/src/cloudlet_bench || rc=1; \
	$(PY) -m ruff check cloudlet_pkg/src bench_pkg/src tests || rc=1; \
	exit $$rc

TEST_TARGETS += lint-python
