"""Fine-tuning: supervised chat tuning (full or LoRA / QLoRA) and preference tuning with DPO."""
