"""The dependency-aware unified cache: pools, tree, cost model, swapper, policies.

Imports no torch and knows nothing of HTTP: the simulator, the property tests and the
cache benchmark run it without a model.
"""

from fastlibra.cache.manager import (
    Allocation,
    CacheError,
    CacheManager,
    CacheStats,
    NotPinned,
    RequestTooLarge,
    Residency,
    UnknownAdapter,
)
from fastlibra.cache.policies import ABLATIONS, BASELINES, POLICIES, Policy, get_policy
from fastlibra.cache.pool import BlockKind, BlockPool, PoolExhausted, Tier
from fastlibra.cache.swapper import CountingMover, Move, MoveKind, Mover

__all__ = [
    "ABLATIONS", "BASELINES", "POLICIES", "Allocation", "BlockKind", "BlockPool", "CacheError",
    "CacheManager", "CacheStats", "CountingMover", "Move", "MoveKind", "Mover", "NotPinned",
    "Policy", "PoolExhausted", "RequestTooLarge", "Residency", "Tier", "UnknownAdapter", "get_policy",
]
