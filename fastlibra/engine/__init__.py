"""The engine: requests, the continuous-batching scheduler and the step loop.

It drives either the simulated runner (`fastlibra.sim`) or the model runner; every cache
decision goes through `fastlibra.cache.CacheManager`. No torch, no HTTP.
"""
