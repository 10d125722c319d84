"""Readers for the few-shot benchmark files users have on disk (see DATA_FORMATS.md).

`layouts.detect` tells the format from the files present; each family module (`cifar`, `imagenet`,
`omniglot`) reads its files into per-split `sources.RawClasses`, checked against a `splits.ClassSplit`;
`preprocess` turns stored images into model inputs.
"""
