"""QLoRA fine-tuning: 4-bit base + LoRA + TRL SFT, with checkpoints, resume and evaluation."""

__version__ = "0.1.0"
