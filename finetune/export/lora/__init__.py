"""LoRA and its variants' file layouts, one module each, imported in one direction only:

    layers (what a file means) <- diffusers, kohya_metadata <- kohya <- lycoris;  diffusers <- peft_adapter
    layers <- kohya_flux (Flux's BFL names, fused q/k/v) <- kohya_names <- kohya
    all of them <- files (whole files: which layout, reading, what inspect says, what training writes)
    files <- loading (into a diffusers pipeline)

The format registry, finetune/export/formats.py, sits on top of them; nothing here imports it.
"""
