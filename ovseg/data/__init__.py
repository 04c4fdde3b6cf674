"""Data: dataset catalog, readers of the on-disk formats, image reading, transforms."""

from ovseg.data.catalog import (
    BENCHMARKS,
    BenchmarkInfo,
    DatasetError,
    SemSegDataset,
    class_names,
    class_vocabulary,
    datasets_root,
    get_benchmark,
    list_benchmarks,
    load_dataset,
    register_custom_dataset,
    register_from_config,
)
from ovseg.data.readers import read_label

__all__ = [
    "BENCHMARKS",
    "BenchmarkInfo",
    "DatasetError",
    "SemSegDataset",
    "class_names",
    "class_vocabulary",
    "datasets_root",
    "get_benchmark",
    "list_benchmarks",
    "load_dataset",
    "read_label",
    "register_custom_dataset",
    "register_from_config",
]
