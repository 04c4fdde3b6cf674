"""Data: dataset catalog, readers of the on-disk formats, image reading, transforms."""
