"""The model under study: offline loading, named sites and hooks, feature sources (sources.py), SAE formats and
training."""
