"""`kdeploy batch`: many `kdeploy optimize` jobs from a TOML manifest, on Ray.

- `manifest`: the manifest schema and its expansion into jobs (globs, models × targets).
- `runner`: the jobs as Ray tasks, each one `python -m kdeploy optimize ...` child process.
- `summary`: one summary row per job, from its exit code and report.
- the host-wide lock that serializes the timing phase of concurrent jobs is `kdeploy.run.lock` (the run holds it).

Importing this package imports neither Ray nor an ML framework.
"""
