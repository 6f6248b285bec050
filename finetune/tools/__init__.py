"""LoRA and adapter file tools behind `finetune convert | merge | resize | inspect`."""
