"""Benchmark drivers: one module per `fastlibra bench` subcommand (and `simulate`), and the
shared reporting they print and write with. Nothing in the core packages imports this."""
