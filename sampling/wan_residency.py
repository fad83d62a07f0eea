"""Where Wan's experts live during one sampling run: a pure decision from the card, the experts' sizes and
the headroom that activations and the VAE need. No comfy import; ``host/wan_residency.py`` carries it out.

Three plans, chosen by what fits in ``budget = min(free VRAM, cap) - headroom``:

| plan | when | during the high phase | during the low phase | putting an expert away |
|---|---|---|---|---|
| both_resident | all experts fit | high (+ low from run 2 on) | high + low | never |
| one_at_a_time | the largest expert fits | high | low | re-point to its pinned host copy: free |
| streamed | not even one fits | ``budget`` bytes of high | ``budget`` bytes of low | the same, free |

Why: core's unload re-allocates pageable host memory (17.9 s for a 28.6 GB expert on an H200) and
keeps both experts whenever they fit, leaving the VAE no room. A persistent pinned host copy makes putting
an expert away free and loading it run at PCIe speed; the headroom keeps the VAE off its tiled retry.
"""

from __future__ import annotations

from dataclasses import dataclass

BOTH_RESIDENT, ONE_AT_A_TIME, STREAMED = "both_resident", "one_at_a_time", "streamed"
HIGH, LOW = "high", "low"


@dataclass(frozen=True)
class ResidencyPlan:
    """``phases``: (phase, experts allowed on the GPU during it); an expert not allowed is put away first.
    ``weight_budget``: bytes of one expert's weights on the GPU (streamed: the rest runs from pinned host
    memory); ``host_copies``: keep a persistent pinned host copy of each expert."""

    plan: str
    weight_budget: int
    phases: tuple[tuple[str, frozenset[str]], ...]
    host_copies: bool

    def allowed(self, phase: str) -> frozenset[str]:
        return dict(self.phases)[phase]


def _phases(experts: tuple[str, ...], together: bool) -> tuple[tuple[str, frozenset[str]], ...]:
    return tuple((name, frozenset(experts) if together else frozenset({name})) for name in experts)


def plan_residency(free_bytes: int, expert_bytes: dict[str, int], headroom_bytes: int,
                   cap_bytes: int | None = None) -> ResidencyPlan:
    """The plan for experts ``expert_bytes`` (run order: ``{"high": .., "low": ..}``, or one entry for
    Wan 2.1 / a single expert) on a card with ``free_bytes`` free, capped at ``cap_bytes`` (None: no cap)."""
    card = free_bytes if not cap_bytes else min(free_bytes, cap_bytes)
    budget = max(0, card - headroom_bytes)
    experts = tuple(expert_bytes)
    if sum(expert_bytes.values()) <= budget:
        return ResidencyPlan(BOTH_RESIDENT, max(expert_bytes.values()), _phases(experts, True), False)
    if max(expert_bytes.values()) <= budget:
        return ResidencyPlan(ONE_AT_A_TIME, max(expert_bytes.values()), _phases(experts, False), True)
    return ResidencyPlan(STREAMED, budget, _phases(experts, False), True)


def resident_during_calls(plan: ResidencyPlan, steps_per_phase: dict[str, int], runs: int = 2,
                          ) -> list[frozenset[str]]:
    """The experts on the GPU at each model call over ``runs`` runs: an expert loads at its first call,
    stays until a phase that does not allow it. What ``tests/unit/test_wan_residency.py`` checks the host
    against, call by call."""
    resident: set[str] = set()
    seen = []
    for _ in range(runs):
        for phase, allowed in plan.phases:
            resident &= allowed
            resident.add(phase)
            seen += [frozenset(resident)] * steps_per_phase.get(phase, 0)
    return seen
