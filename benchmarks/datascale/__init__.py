"""Measurements for data at real scale (issue 15): `stages` (per-document stages vs tokenizer-alone throughput)
and `langid_accuracy` (language ID per language on FLORES-200 devtest sentences)."""
