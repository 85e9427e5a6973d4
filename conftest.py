# Repo-level pytest set-up: the conformance plugin holds the options and the GPU skip logic,
# so `pytest`, `pytest tests` and `pytest conformance` behave the same.
pytest_plugins = ["conformance.plugin"]
