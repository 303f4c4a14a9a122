"""The process a recipe runs in, the lowest layer: one-line errors and the exit status (`errors`), the
process group under torchrun (`distributed`), peak memory (`memory`). Imports nothing else of utils."""
