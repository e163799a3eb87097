"""Data-at-scale measurements (issue 15), each module with `main(argv)`; `benchmarks/data_scale.py` runs them."""
