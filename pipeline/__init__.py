"""Training system for RDI-Net: config, DALI data, staged DeepSpeed training, evaluation."""
