"""How much a routing profile (llamahot.profile) should weigh beside observed routing: the first half of a
recorded trace is the profile, the second half is replayed through the decayed policy with the profile as a
prior of several weights (benchmarks/RESULTS.md, session 19; PRIOR_WEIGHT in llamahot/policy.py).

    python benchmarks/prior_study.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llamahot.policy import DecayedFrequency, replay, swap_plan

TRACES = {"calibrated": "policies-qwen3moe-30b-a3b-routed.trace.npz", "trained": "policies-llamahot-code-moe.trace.npz"}


class Primed(DecayedFrequency):
    """The decayed policy with a prior: decaying (added to the score once) or kept (added at each choice)."""

    def __init__(self, *args, rates: np.ndarray, mode: str | None, weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        steady = weight * rates / (1 - self.decay_per_token)
        self.kept = steady if mode == "kept" else np.zeros_like(steady)
        if mode == "decaying":
            self.score += steady

    def choose(self, resident):
        return swap_plan(self.score + self.kept, resident, self.k, self.margin)


def main() -> None:
    folder = Path(__file__).parent / "results"
    for name, file in TRACES.items():
        trace = np.load(folder / file)["trace"].astype(np.int64)
        n_tokens, n_layers, n_expert = trace.shape
        k = max(1, round(n_expert * 0.4))
        half = n_tokens // 2
        rates, test = trace[:half].sum(axis=0) / half, trace[half:]

        def static_hit(score):
            top = np.argsort(-score, axis=1)[:, :k]
            mask = np.zeros((n_layers, n_expert), bool)
            np.put_along_axis(mask, top, True, 1)
            served = test.sum(axis=0)
            return served[mask].sum() / served.sum()

        print(f"{name}: {n_tokens} tokens, K={k}: static hot set from the profile {static_hit(rates):.3f}, "
              f"in-sample {static_hit(test.sum(axis=0)):.3f}")
        for label, interval, half_life, margin in [("slots 4/128/0.25", 4, 128, 0.25), ("in place 64/2048/3", 64, 2048, 3.0)]:
            for mode, weight in [(None, 0), ("decaying", 1), ("kept", 0.5), ("kept", 1), ("kept", 2)]:
                policy = Primed(n_layers, n_expert, k, half_life=half_life, margin=margin, rates=rates, mode=mode,
                                weight=weight)
                r = replay(policy, test, interval, warmup=16)
                print(f"  {label:20s} prior {str(mode):9s} weight {weight:<3}: hit {r['hit_rate']:.3f}, "
                      f"loads/token {r['loads'] / len(test):.2f}")


if __name__ == "__main__":
    main()
