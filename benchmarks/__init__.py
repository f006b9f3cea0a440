"""Benchmarks of the model, the loaders and the trainer. Each module runs from the repository root
as `python -m benchmarks.NAME`; nothing in rdinet/ or pipeline/ imports them."""
