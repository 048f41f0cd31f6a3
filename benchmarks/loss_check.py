"""The loss check the harness (`harness.first_steps`), W2 (`digits_tta`) and the studies share.

It imports nothing of theirs, so none of them has to import another to use it.
"""
from __future__ import annotations

LOSS_RTOL = 1e-5  # same model, parameters and batch: only the order of float sums may differ
LOSS_ATOL = 1e-6


class LossMismatchError(AssertionError):
    """Two candidates computed different losses on the same batch from the same parameters."""


def check_same_loss(losses: dict[str, float], reference: str = "jnn", rtol: float = LOSS_RTOL,
                    atol: float = LOSS_ATOL) -> None:
    """Raises `LossMismatchError` unless every loss is close to `losses[reference]`.

    Call it on the first-step losses of candidates that start from the same parameters and batch:
    it is what makes a timing comparison a comparison of the same computation.
    """
    ref = losses[reference]
    bad = {k: v for k, v in losses.items() if not abs(v - ref) <= atol + rtol * abs(ref)}
    if bad:
        raise LossMismatchError(
            f"loss check failed: on the same batch and initial parameters {reference} computes loss {ref!r} but "
            + ", ".join(f"{k} computes {v!r}" for k, v in bad.items())
            + f" (tolerance {rtol} relative + {atol}). The peers do not compute the same step: fix the peer "
              f"(model, loss, parameters or batch) before timing it.")
