"""The intervene stage: hooks that steer, clamp and ablate features; generation and strength calibration; the judge
and the verdicts; and the stage that checks explanations causally."""
