"""The lab: the LR range test and its confirmation, sweeps, the generalization verdict and the per-layer
diagnostics (no Qt; ``rangecurve`` and ``generalization`` not even torch, so the app can read them)."""
