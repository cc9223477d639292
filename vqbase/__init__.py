"""What the jobs and the service share, below both: torch-free, stdlib only (MLflow lazily, in `fetch`).

- `vqbase.protocol`: the contract between a job and whoever started it — how the spec travels, the
  `VQTRAIN_PROGRESS` / `VQTRAIN_RESULT` lines and their parser, the environment variable names.
- `vqbase.uris`: what a `models:/` URI and a data URL look like (one parser each).
- `vqbase.local`: `$VQTRAIN_HOME`, and the embedded local MLflow server both sides fall back to.
- `vqbase.fetch`: how `vqmodels.load_*` reaches an MLflow URI (registered as its fetcher entry point).
"""
