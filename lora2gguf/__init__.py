"""lora2gguf: train, convert, merge and verify LoRA adapters for GGUF models."""

__version__ = "0.1.0"
