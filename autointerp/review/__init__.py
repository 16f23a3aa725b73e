"""Reviewing results: terminal rendering of features, scores and verdicts (the web review page comes here too)."""
