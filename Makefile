# README's two commands: `make run` (the job on its built-in default) and `make test`. Each builds .venv itself.
PY := .venv/bin/python
.PHONY: setup run test unit bench
setup:
	@bash scripts/setup.sh
run: setup
	$(PY) -m launch.local_job $(ARGS)
test: setup
	$(PY) -m pytest -q tests
unit: setup  # the pure unit tests alone (seconds): no Ray, vLLM or DeepSpeed process started
	$(PY) -m pytest -q -m "not integration" tests
bench: setup
	$(PY) bench/rewards.py && $(PY) bench/rollout.py && $(PY) bench/learner.py
