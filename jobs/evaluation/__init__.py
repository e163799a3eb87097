"""The pieces of `python -m jobs.eval`: config, model loading, text bits-per-byte, multiple choice, generation
checks, lm-evaluation-harness tasks, the promotion gate and the reports."""
