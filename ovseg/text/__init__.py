"""Text side of open-vocabulary models: prompt templates, vocabularies, text classifiers."""

from ovseg.layers.labels import max_over_synonyms  # where the label helpers live
from ovseg.text.classifier import build_text_classifier, text_cache_dir, text_cache_key
from ovseg.text.templates import TEMPLATE_SETS, get_templates
from ovseg.text.vocabulary import (
    Vocabulary,
    as_vocabulary,
    parse_vocabulary,
    read_vocabulary_file,
)

__all__ = [
    "TEMPLATE_SETS",
    "Vocabulary",
    "as_vocabulary",
    "build_text_classifier",
    "get_templates",
    "max_over_synonyms",
    "parse_vocabulary",
    "read_vocabulary_file",
    "text_cache_dir",
    "text_cache_key",
]
