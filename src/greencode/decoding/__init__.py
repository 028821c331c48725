"""The early-exit decoding loop and the exit controllers."""

from greencode.decoding.controllers import (CheapConfidenceExit, ConfidenceExit, EntropyExit, ExitController, FixedExit, NeverExit,
                                            OracleExit, PolicyExit, RandomExit, SaturationExit, policy_observation)
from greencode.decoding.generate import (KV_STRATEGIES, GenerationResult, Prefill, compute_cost, generate,
                                        generate_lossless, prefill, prefill_chunk)
from greencode.decoding.registry import (ControllerInfo, Resources, build_controller, get_controller,
                                        register_controller)

__all__ = ["CheapConfidenceExit", "ConfidenceExit", "ControllerInfo", "EntropyExit", "ExitController", "FixedExit", "GenerationResult", "KV_STRATEGIES",
           "NeverExit", "OracleExit", "PolicyExit", "Prefill", "RandomExit", "SaturationExit", "compute_cost", "generate", "generate_lossless",
           "policy_observation", "prefill", "prefill_chunk", "Resources", "build_controller", "get_controller",
           "register_controller"]
