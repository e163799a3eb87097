"""Reports and plots: one matplotlib setup (`plots`) for every PNG the platform writes, and report libraries
(`tokenizers`: the tokenizer comparison)."""
