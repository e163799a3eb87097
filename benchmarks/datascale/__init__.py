"""Data-at-scale benchmark parts (issue 15): a synthetic kk/ru/en corpus with planted duplicates (`corpus`), the
scoring of duplicate decisions against the planted pairs (`planted`), and datatrove on the same input
(`datatrove_peer`). Each module has `main(argv)`; `benchmarks/data_scale.py` dispatches to them."""
