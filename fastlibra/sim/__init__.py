"""The simulated runner: step latencies from a model x hardware profile, no torch."""
