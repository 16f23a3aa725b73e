"""The model under study: offline loading, named sites and hooks, SAE formats and training."""
