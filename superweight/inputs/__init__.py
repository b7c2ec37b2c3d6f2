"""What a run reads: models (HF, GGUF), tokenizers, corpora and downstream tasks."""
