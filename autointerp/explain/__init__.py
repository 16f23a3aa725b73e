"""The explain stage: explainers (an LLM, the token baseline) and the stage that runs them over features."""
