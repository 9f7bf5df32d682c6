"""Training stages: LoRA SFT shared by alignment and the harmful fine-tuning attack."""
