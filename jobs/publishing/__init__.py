"""Publishing a model to the Hugging Face Hub (the library behind `jobs.publish`).

`export` gathers the files of the model's HF export into the folder that is uploaded; `record` reads what the
registry, MLflow and the report files hold about the model (lineage, eval results, training data, tokenizer
efficiency, loss curves); `card` renders that record as the model card (README.md); `hub` uploads the folder in
one commit and turns the Hub's refusals and network failures into errors that name the fix.
"""
