"""rft.openrlhf.actor_stats: the policy update's step statistics, without a patched tree.

Expected values come from numpy or by hand on planted micro-batches, never from the module.
``tests/test_metrics_patches.py`` runs the same statistics through the patched
``ActorPPOTrainer.ppo_train`` and ``training_step``.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rft.openrlhf import actor_stats
from rft.openrlhf.actor_stats import ActorStepMetrics, accumulation_boundary, combine_rank_records, global_grad_norm


def prompt_hash(ids: list[int]) -> str:
    """A prompt hash by its definition: SHA-1 of the ids as little-endian int64, first 16 hex digits."""
    return hashlib.sha1(np.array(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def micro_batch(adv, entropy, prompt=(1, 2), **loss_attrs):
    """One planted micro-batch of a single sample: (experience, model output, loss) as the actor has them.

    The sample is ``prompt`` followed by one response token per advantage; OpenRLHF's action mask
    is shifted by one (``action_mask[j]`` marks ``sequence[j + 1]``), so it covers the last columns.
    """
    n = len(adv)
    sequence = list(prompt) + [7] * n
    mask = torch.zeros(1, len(sequence) - 1, dtype=torch.bool)
    mask[0, -n:] = True
    experience = SimpleNamespace(
        action_mask=mask, advantages=torch.zeros(mask.shape).masked_scatter(mask, torch.tensor(adv)),
        sequences=torch.tensor([sequence]),
    )
    # the actor's entropies cover the whole sequence (minus one); only the action columns count
    full = torch.full((1, len(sequence) - 1), 99.0)
    full[0, -n:] = torch.tensor(entropy)
    return experience, SimpleNamespace(entropy=full), SimpleNamespace(**loss_attrs)


class Engine:
    """DeepSpeed engine surface: an accumulation boundary every ``gas`` micro-steps, planted norms."""

    def __init__(self, gas: int, norms: list):
        self.gas, self.norms, self.micro = gas, list(norms), 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.gas == 0

    def step(self) -> None:
        self.micro += 1

    def get_global_grad_norm(self):
        """The norm of the last optimizer step taken; None before the first."""
        taken = self.micro // self.gas
        return self.norms[min(taken, len(self.norms)) - 1] if taken else None


def run_micro_steps(metrics: ActorStepMetrics, engine: Engine, batches) -> None:
    """What the patched training_step does around backward and the optimizer step."""
    for experience, output, loss in batches:
        metrics.add_micro_batch(experience, output, loss, engine)
        engine.step()
        metrics.optimizer_stepped(engine)


def test_step_statistics_over_micro_batches_are_exact():
    tails = [dict(log_ratio_max=0.3, log_ratio_min=-0.1, ratio_max=1.35, tokens_in_batch=2),
             dict(log_ratio_max=0.9, log_ratio_min=-0.4, ratio_max=2.46, tokens_in_batch=3),
             dict(log_ratio_max=0.2, log_ratio_min=-0.7, ratio_max=1.22, tokens_in_batch=1)]
    planted = [([1.0, -1.0], [0.5, 0.1], (3, 4), tails[0]), ([2.0, 0.5, 0.0], [1.5, 2.0, 0.2], (5,), tails[1]),
               ([-0.5], [0.7], (3, 4), tails[2])]
    metrics = ActorStepMetrics()
    engine = Engine(gas=2, norms=[4.0, 9.0])
    run_micro_steps(metrics, engine, [micro_batch(a, e, p, **t) for a, e, p, t in planted])
    out = combine_rank_records([metrics.local_record()])

    adv = np.array([x for a, _, _, _ in planted for x in a])
    ent = np.array([x for _, e, _, _ in planted for x in e])
    assert out["advantage_mean"] == pytest.approx(adv.mean()) and out["advantage_std"] == pytest.approx(adv.std())
    assert (out["advantage_max"], out["advantage_min"]) == (2.0, -1.0)
    assert out["entropy_mean"] == pytest.approx(ent.mean())  # the planted 99s outside the actions never count
    assert out["entropy_p10"] == pytest.approx(np.quantile(ent, 0.1))
    assert out["entropy_p90"] == pytest.approx(np.quantile(ent, 0.9))
    assert (out["log_ratio_max"], out["log_ratio_min"], out["ratio_max"]) == (0.9, -0.7, 2.46)
    assert out["trained_tokens"] == 6.0
    # micro-steps 1-2 close optimizer step 1, micro-step 3 is not a boundary: one step, norm 4
    assert out["optimizer_steps"] == 1.0 and out["grad_norm"] == 4.0 and out["grad_norm_max"] == 4.0
    (step,) = out["optimizer_step_details"]
    assert step["prompt_hashes"] == [prompt_hash([3, 4]), prompt_hash([5])]
    assert (step["log_ratio_max"], step["log_ratio_min"], step["ratio_max"]) == (0.9, -0.4, 2.46)
    assert out["metric_errors"] == 0.0


def test_cross_rank_maxima_are_maxima_not_means_of_maxima():
    tails0 = dict(log_ratio_raw_max=1.0, log_ratio_min=-0.5, log_ratio_max=1.0, log_ratio_abs_p99=0.9, ratio_max=2.7)
    tails1 = dict(log_ratio_raw_max=5.0, log_ratio_min=-2.0, log_ratio_max=5.0, log_ratio_abs_p99=4.0, ratio_max=148.0)
    records = []
    for adv, ent, tails in (([1.0, -1.0], [0.1, 0.2], tails0), ([2.0, 0.0, 0.5], [3.0, 0.4, 0.5], tails1)):
        metrics = ActorStepMetrics()
        metrics.add_micro_batch(*micro_batch(adv, ent, tokens_in_batch=len(adv), **tails))
        metrics.add_optimizer_step(7.0)
        records.append(metrics.local_record())
    out = combine_rank_records(records)
    assert out["log_ratio_raw_max"] == 5.0 and out["ratio_max"] == 148.0 and out["log_ratio_abs_p99"] == 4.0
    assert out["log_ratio_min"] == -2.0
    assert out["ratio_max"] != pytest.approx((2.7 + 148.0) / 2)  # what OpenRLHF's mean all-reduce would log
    ent = np.array([0.1, 0.2, 3.0, 0.4, 0.5])
    assert out["entropy_p10"] == pytest.approx(np.quantile(ent, 0.1))
    assert out["entropy_p90"] == pytest.approx(np.quantile(ent, 0.9))
    adv = np.array([1.0, -1.0, 2.0, 0.0, 0.5])
    assert out["advantage_mean"] == pytest.approx(adv.mean()) and out["advantage_std"] == pytest.approx(adv.std())
    assert out["trained_tokens"] == 5
    step = out["optimizer_step_details"][0]
    assert step["log_ratio_max"] == 5.0 and step["log_ratio_min"] == -2.0 and step["grad_norm"] == 7.0


def test_no_grad_norm_is_logged_before_deepspeed_has_one():
    metrics = ActorStepMetrics()
    engine = Engine(gas=8, norms=[3.0])  # no boundary within 4 micro-steps
    run_micro_steps(metrics, engine, [micro_batch([1.0], [0.5]) for _ in range(4)])
    out = metrics.finalize()
    assert out["optimizer_steps"] == 0.0 and "grad_norm" not in out and "grad_norm_max" not in out


@pytest.mark.parametrize(
    ("engine", "boundary", "norm"),
    [
        (None, True, None),  # no DeepSpeed engine: every step is an optimizer step, no norm to read
        (SimpleNamespace(is_gradient_accumulation_boundary=lambda: False, get_global_grad_norm=lambda: None), False, None),
        (SimpleNamespace(is_gradient_accumulation_boundary=lambda: True, get_global_grad_norm=lambda: torch.tensor(2.5)),
         True, 2.5),  # ZeRO-3 returns a tensor
        (SimpleNamespace(is_gradient_accumulation_boundary=lambda: 1 / 0, get_global_grad_norm=lambda: 1 / 0), False, None),
    ],
    ids=["no-engine", "before-first-step", "tensor-norm", "raising"],
)
def test_reading_deepspeed_never_raises(engine, boundary, norm):
    assert accumulation_boundary(engine) is boundary
    assert global_grad_norm(engine) == norm


def test_a_malformed_micro_batch_is_counted_and_training_goes_on():
    metrics = ActorStepMetrics()
    metrics.add_micro_batch(object(), None, object())
    assert metrics.errors == 1
    assert metrics.finalize()["metric_errors"] == 1


def test_a_record_that_cannot_be_combined_logs_nothing_rather_than_raise(monkeypatch):
    metrics = ActorStepMetrics()
    monkeypatch.setattr(actor_stats, "gather_rank_records", lambda record: [record, {"adv": None}])
    assert metrics.finalize() == {}


def rank_worker(rank: int, world: int, init_file: str, out_dir: str, planted: list) -> None:
    """One policy rank in a spawned process: ActorStepMetrics over a real gloo group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = ActorStepMetrics()
        for adv, ent, tails, norm in planted[rank]:
            metrics.add_micro_batch(*micro_batch(adv, ent, (9 + rank, 8), tokens_in_batch=len(adv), **tails))
            metrics.add_optimizer_step(norm)
        out = metrics.finalize()
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(out, f)


@pytest.mark.slow
def test_two_ranks_over_torch_distributed_end_with_the_same_exact_values(tmp_path):
    import torch.multiprocessing as mp

    tails = [
        dict(log_ratio_raw_max=0.7, log_ratio_min=-0.2, log_ratio_max=0.7, log_ratio_abs_p99=0.6, ratio_max=2.0),
        dict(log_ratio_raw_max=6.0, log_ratio_min=-3.0, log_ratio_max=6.0, log_ratio_abs_p99=5.5, ratio_max=403.0),
    ]
    planted = [
        [([1.0, -1.0, 0.5], [0.1, 0.9, 0.3], tails[0], 60.0), ([0.2, 0.2], [1.5, 0.2], tails[0], 2.0)],
        [([2.0, 0.0, -0.5], [0.05, 2.5, 0.4], tails[1], 60.0), ([0.0, -2.0], [0.6, 0.7], tails[1], 2.0)],
    ]
    mp.start_processes(rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), planted), nprocs=2,
                       start_method="spawn")
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outs[0] == outs[1]
    out = outs[0]
    adv = np.array([x for rank in planted for mb in rank for x in mb[0]])
    ent = np.array([x for rank in planted for mb in rank for x in mb[1]])
    assert out["advantage_mean"] == pytest.approx(adv.mean()) and out["advantage_std"] == pytest.approx(adv.std())
    assert out["advantage_max"] == 2.0 and out["advantage_min"] == -2.0
    assert out["entropy_p10"] == pytest.approx(np.quantile(ent, 0.1))
    assert out["entropy_p90"] == pytest.approx(np.quantile(ent, 0.9))
    assert out["ratio_max"] == 403.0 and out["log_ratio_min"] == -3.0 and out["log_ratio_abs_p99"] == 5.5
    assert out["grad_norm"] == pytest.approx(31.0) and out["grad_norm_max"] == 60.0
    first, second = out["optimizer_step_details"]
    assert first["prompt_hashes"] == [prompt_hash([9, 8]), prompt_hash([10, 8])]  # both ranks' prompts, rank order
    assert first["ratio_max"] == 403.0 and second["log_ratio_min"] == -3.0
    assert out["trained_tokens"] == 10
