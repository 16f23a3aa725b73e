"""The score stage: scorers (simulation, detection, fuzzing, embedding), the simulators and embedder they use, and
the stage that scores every explanation on the test split."""
