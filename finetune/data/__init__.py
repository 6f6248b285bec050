"""The data pipeline: sources -> decoded, augmented images with captions -> a resumable batch stream."""
from finetune.data.dataset import BatchOrder, ImageCaptionDataset, collate, make_loader
from finetune.data.sources import DataError, Example, list_examples

__all__ = ["BatchOrder", "DataError", "Example", "ImageCaptionDataset", "collate", "list_examples", "make_loader"]
