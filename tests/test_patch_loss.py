"""ratio_logging_loss.patch: the real PolicyLoss of OpenRLHF 0.9.3, pristine and patched.

* Ordinary log-ratios: loss, clip ratio, ppo_kl, vllm_kl and the gradient are bit-identical to
  pristine 0.9.3 in every PolicyLoss variant (ppo, dual-clip, gspo, vLLM IS tis/icepop/mis).
* A planted log-ratio of 80 gives the loss of the formula with the log-ratio clamped at 20, and one
  of 1000 (beyond float32's exp range even as a GSPO sequence mean) a finite loss; pristine overflows.
* The tail diagnostics stored on the instance are checked against numpy over the masked tokens.
* Canary: the pristine lines the patch hooks into are still there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import oprl

# Every PolicyLoss configuration 0.9.3 has (policy_loss_type x dual-clip x IS correction type).
VARIANTS = {
    "ppo": {},
    "ppo_dual_clip": {"dual_clip": 3.0},
    "ppo_tis": {"enable_vllm_is_correction": True, "vllm_is_truncated_threshold": [0.5, 2.0]},
    "ppo_icepop": {
        "enable_vllm_is_correction": True,
        "vllm_is_truncated_threshold": [0.5, 2.0],
        "vllm_is_correction_type": "icepop",
    },
    "ppo_mis": {
        "enable_vllm_is_correction": True,
        "vllm_is_truncated_threshold": [0.5, 2.0],
        "vllm_is_correction_type": "mis",
    },
    "gspo": {"policy_loss_type": "gspo"},
    "gspo_is": {"policy_loss_type": "gspo", "enable_vllm_is_correction": True},
}


def xfail_pristine(reason: str, raises: type[BaseException]) -> list:
    """("pristine", "patched"), where the pristine run must fail with ``raises`` (strict: an unexpected
    pass fails, and so does a failure of another type)."""
    return [pytest.param("pristine", marks=pytest.mark.xfail(strict=True, reason=reason, raises=raises)), "patched"]


def policy_loss_class(root):
    return oprl.load(root, "openrlhf.models.loss").PolicyLoss


def make_batch(seed: int = 0, batch: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    """Log-probs as the actor hands them over: padded positions are 0 in both, mask is 0/1."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length)
    mask[0, 8:] = 0
    mask[2, :3] = 0
    old = -torch.rand(batch, length, generator=gen) * 3
    new = old + torch.randn(batch, length, generator=gen) * 0.3
    rollout = old + torch.randn(batch, length, generator=gen) * 0.2
    adv = torch.randn(batch, 1, generator=gen).expand(batch, length).clone()
    return {
        "log_probs": new * mask,
        "old_log_probs": old * mask,
        "rollout_log_probs": rollout * mask,
        "advantages": adv,
        "action_mask": mask,
    }


def run_loss(cls, kwargs: dict, batch: dict):
    """Forward and backward; returns the loss outputs, d loss / d log_probs and the instance."""
    loss_fn = cls(**kwargs)
    log_probs = batch["log_probs"].clone().requires_grad_(True)
    loss, clip_ratio, ppo_kl, vllm_kl = loss_fn(
        log_probs,
        batch["old_log_probs"],
        batch["advantages"],
        action_mask=batch["action_mask"],
        rollout_log_probs=batch["rollout_log_probs"],
    )
    loss.backward()
    return (loss.detach(), clip_ratio, ppo_kl, vllm_kl), log_probs.grad, loss_fn


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ordinary_inputs_are_bit_identical_to_pristine(pristine_root, patched_root, variant, seed):
    batch = make_batch(seed)
    pristine_out, pristine_grad, _ = run_loss(policy_loss_class(pristine_root), VARIANTS[variant], batch)
    patched_out, patched_grad, _ = run_loss(policy_loss_class(patched_root), VARIANTS[variant], batch)
    for a, b in zip(pristine_out, patched_out):
        if a is None:
            assert b is None
        else:
            assert torch.equal(a, b), (variant, a, b)
    assert torch.equal(pristine_grad, patched_grad)


def plant(batch: dict, value: float) -> dict:
    """Put log-ratio ``value`` on one action token whose advantage is negative (the unclipped side)."""
    batch = {k: v.clone() for k, v in batch.items()}
    batch["advantages"][1] = -1.5
    batch["log_probs"][1, 4] = batch["old_log_probs"][1, 4] + value
    return batch


@pytest.mark.parametrize("variant", ["ppo", "ppo_dual_clip", "ppo_tis", "gspo"])
@pytest.mark.parametrize(
    "root_name", xfail_pristine("0.9.3 has no log-ratio clamp: exp(1000) overflows", AssertionError)
)
def test_log_ratio_beyond_float32_exp_gives_finite_loss(request, root_name, variant):
    cls = policy_loss_class(request.getfixturevalue(f"{root_name}_root"))
    (loss, *_), grad, _ = run_loss(cls, VARIANTS[variant], plant(make_batch(), 1000.0))
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("variant", ["ppo_icepop", "ppo_mis"])
@pytest.mark.parametrize(
    "root_name", xfail_pristine("0.9.3 multiplies inf by a 0/1 filter mask: NaN", AssertionError)
)
def test_extreme_vllm_is_log_ratio_is_filtered_not_nan(request, root_name, variant):
    """icepop/mis filter out an IS weight far outside the interval; unclamped, 0 * inf is NaN."""
    cls = policy_loss_class(request.getfixturevalue(f"{root_name}_root"))
    batch = make_batch()
    batch["old_log_probs"][1, 4] = batch["rollout_log_probs"][1, 4] + 100.0
    batch["log_probs"][1, 4] = batch["old_log_probs"][1, 4]
    (loss, *_), grad, _ = run_loss(cls, VARIANTS[variant], batch)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()


def expected_ppo_loss(batch: dict, clamp: float) -> torch.Tensor:
    """PPO clipped surrogate (token mean over the mask) written out, with the log-ratio clamped."""
    log_ratio = (batch["log_probs"] - batch["old_log_probs"]).clamp(-clamp, clamp)
    ratio = log_ratio.exp()
    adv = batch["advantages"]
    surr = torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    mask = batch["action_mask"]
    return -(surr * mask).sum() / mask.sum()


@pytest.mark.parametrize(
    "root_name", xfail_pristine("0.9.3 exponentiates the raw log-ratio of 80", AssertionError)
)
def test_log_ratio_80_loss_equals_clamped_formula(request, root_name):
    cls = policy_loss_class(request.getfixturevalue(f"{root_name}_root"))
    batch = plant(make_batch(), 80.0)
    (loss, *_), grad, _ = run_loss(cls, {}, batch)
    torch.testing.assert_close(loss, expected_ppo_loss(batch, 20.0), rtol=1e-6, atol=0)
    assert grad[1, 4] == 0  # the clamped token no longer pushes the update


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("root_name", xfail_pristine("0.9.3 stores no log-ratio diagnostics", AttributeError))
def test_diagnostics_over_masked_tokens(request, root_name, variant):
    cls = policy_loss_class(request.getfixturevalue(f"{root_name}_root"))
    batch = plant(make_batch(), 80.0)
    batch["log_probs"][2, 6] = batch["old_log_probs"][2, 6] - 50.0
    # A padded position carrying a huge log-ratio must not reach the statistics.
    batch["log_probs"][0, 9] = 200.0
    _, _, loss_fn = run_loss(cls, VARIANTS[variant], batch)

    # The policy log-ratio the variant exponentiates, before any IS correction replaces it.
    reference = batch["rollout_log_probs"] if variant == "gspo_is" else batch["old_log_probs"]
    mask = batch["action_mask"].bool()
    raw = (batch["log_probs"] - reference)[mask].numpy().astype(np.float64)
    clamped = np.clip(raw, -20, 20)
    assert loss_fn.tokens_in_batch == int(mask.sum()) == 27
    assert loss_fn.log_ratio_raw_max == pytest.approx(raw.max(), rel=1e-6)
    assert raw.max() > 79 and raw.min() < -49  # the planted tokens are in the masked set
    assert loss_fn.log_ratio_max == 20.0
    assert loss_fn.log_ratio_min == -20.0
    assert loss_fn.ratio_max == pytest.approx(math.exp(20.0), rel=1e-6)
    assert loss_fn.log_ratio_abs_p99 == pytest.approx(np.percentile(np.abs(clamped), 99), rel=1e-6)
    for name in ("log_ratio_raw_max", "log_ratio_min", "log_ratio_max", "log_ratio_abs_p99", "ratio_max"):
        assert type(getattr(loss_fn, name)) is float, name  # plain floats: no graph, no device
    assert type(loss_fn.tokens_in_batch) is int


@pytest.mark.parametrize("root_name", xfail_pristine("0.9.3 stores no log-ratio diagnostics", AttributeError))
def test_diagnostics_are_per_micro_batch(request, root_name):
    cls = policy_loss_class(request.getfixturevalue(f"{root_name}_root"))
    loss_fn = cls()
    extreme, ordinary = plant(make_batch(), 80.0), make_batch(seed=3)
    for batch in (extreme, ordinary):
        loss_fn(batch["log_probs"], batch["old_log_probs"], batch["advantages"], action_mask=batch["action_mask"])
    mask = ordinary["action_mask"].bool()
    raw = (ordinary["log_probs"] - ordinary["old_log_probs"])[mask]
    assert loss_fn.log_ratio_raw_max == pytest.approx(raw.max().item())
    assert loss_fn.log_ratio_max < 20.0


def test_canary_pristine_policy_loss_hooks():
    """The 0.9.3 lines the patch hooks into; if this fails, upstream changed PolicyLoss: remake the patch
    (and retire it if upstream now bounds the PPO log-ratio itself)."""
    source = (oprl.SITE / "openrlhf" / "models" / "loss.py").read_text()
    for line in (
        "            log_ratio = log_probs - old_log_probs\n            ratio = log_ratio.exp()\n",
        "                log_ratio = log_probs - old_log_probs\n            ratio = (log_ratio * action_mask)",
        "            log_ratio = old_log_probs - rollout_log_probs\n",
    ):
        assert line in source
    assert "clamp(-20" not in source and "log_ratio_max" not in source
