"""Adaptive weighting strategies (uncertainty, GradNorm, PCGrad, DWA) register here."""
