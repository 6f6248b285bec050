"""File I/O below every other package: safetensors and pickle files, and writing files and folders atomically.

Nothing here imports from the rest of finetune except finetune.file_errors and finetune.paths, so any layer may
use it (the models, the data caches, the loop, the exporters)."""
