"""The vector-quantization layer and its parts (one concern per file)."""
