"""megaseek: DeepSeek-style LLM pretraining on DeepSpeed with 3D parallelism."""
