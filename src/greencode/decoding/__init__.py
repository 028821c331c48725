"""The early-exit decoding loop and the exit controllers."""

from greencode.decoding.controllers import (ConfidenceExit, EntropyExit, ExitController, FixedExit, NeverExit,
                                            OracleExit, PolicyExit, policy_observation)
from greencode.decoding.generate import KV_STRATEGIES, GenerationResult, Prefill, compute_cost, generate, prefill

__all__ = ["ConfidenceExit", "EntropyExit", "ExitController", "FixedExit", "GenerationResult", "KV_STRATEGIES",
           "NeverExit", "OracleExit", "PolicyExit", "Prefill", "compute_cost", "generate", "policy_observation",
           "prefill"]
