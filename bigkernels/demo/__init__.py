"""A small GPT-style language model and real text every machine has (Python's standard library
sources), for the demo and for accuracy tests of the compressed layers."""
