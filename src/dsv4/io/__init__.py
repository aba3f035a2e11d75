"""Files: DeepSeek-V4 safetensors checkpoints (FP8 weights) and golden cases on disk."""
