"""Activation stores -> trained Universal SAE runs (synth, model, loader, training loop)."""
