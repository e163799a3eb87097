"""Corpus preprocessing (`python -m jobs.preprocess`): the stage functions and the Ray Data pipeline.

Modules without Ray (usable in a plain loop, a notebook or a test): `config` (typed config), `sources` (finding
and reading raw files), `clean` (normalisation, quality filters, PII scrubbing), `langid` (language and script
identification), `dedup` (exact and MinHash-LSH near-duplicate detection), `plan` (mixture, split and shard
plans), `report`, `hub` (`make data` downloads). `stages` adapts them to Arrow batches; `pipeline` chains those
as named Ray Data stages.
"""
