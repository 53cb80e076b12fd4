"""``bench/component_timer.py``: the per-component breakdown of a gpt-oss step sees every phase and
changes nothing it measures.

On the CPU (wall-clock edges instead of CUDA events) with bench_actor_breakdown.py's toy-size
gpt-oss: transformers 4.57.6's own modules, peft LoRA on q/k/v/o, reentrant gradient
checkpointing as the actor sets it, and, for the ZeRO-3 figures, DeepSpeed 0.18.5 on a
one-process gloo group. The GPU figures come from the same code on an H100 (bench/RESULTS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_actor_breakdown as bab  # noqa: E402
import component_timer as ct  # noqa: E402

import conftest  # noqa: E402

LAYERS = 3


@pytest.fixture()
def model_and_batch():
    model = bab.build_model("tiny", LAYERS, lora_rank=4, device="cpu", seed=0)
    batch = bab.make_batch(model.config.vocab_size, seq=48, response=24, device="cpu")
    return model, batch


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_timer_changes_neither_log_probs_nor_gradients(model_and_batch):
    model, batch = model_and_batch
    plain_lp = bab.train_step(model, batch)
    plain = lora_grads(model)
    bab.zero_grads(model)
    timer = ct.ComponentTimer(model, cuda=False)
    with timer.pass_("train"):
        timed_lp = bab.train_step(model, batch, timer)
    timed = lora_grads(model)
    timer.remove()
    assert torch.equal(plain_lp, timed_lp)
    assert plain.keys() == timed.keys() and len(plain) == 4 * 2 * LAYERS  # A and B of q/k/v/o per layer
    for name in plain:
        assert torch.equal(plain[name], timed[name]), name


def test_training_step_has_forward_recompute_and_backward_of_each_component(model_and_batch):
    model, batch = model_and_batch
    timer = ct.ComponentTimer(model, cuda=False)
    with timer.pass_("train"):
        bab.train_step(model, batch, timer)
    report = timer.report()
    timer.remove()
    assert report["layers"] == LAYERS
    per_layer = report["per_layer_ms"]
    for component in ("attention", "router", "experts", "norms", "layer"):
        assert set(per_layer[component]) == {"forward", "recompute", "backward"}, component
        assert all(ms > 0 for ms in per_layer[component].values()), component
    # one call per layer and phase (norms: two per layer); the head's norm and projection outside the layers
    assert report["calls"]["attention"] == 3 * LAYERS
    assert report["calls"]["norms"] == 3 * 2 * LAYERS
    assert report["calls"]["lm_head"] == 2 * 2  # final norm + output projection, forward and backward
    for phase in ("forward", "recompute"):  # sibling components sit inside their layer's interval
        inside = sum(per_layer[c][phase] for c in ("attention", "router", "experts", "norms"))
        assert inside <= per_layer["layer"][phase]
        assert per_layer["layer_other"][phase] == pytest.approx(per_layer["layer"][phase] - inside)
    assert set(report["head_ms"]["log_prob"]) == {"forward", "backward"}
    layers_total = sum(per_layer["layer"].values()) * LAYERS
    assert layers_total < report["pass_ms"]
    assert report["zero3_ms_whole_model"] == {}


def test_log_prob_forward_is_one_phase(model_and_batch):
    model, batch = model_and_batch
    timer = ct.ComponentTimer(model, cuda=False)
    with timer.pass_("logprob"):
        bab.logprob_forward(model, batch)
    report = timer.report()
    timer.remove()
    assert {phase for by in report["per_layer_ms"].values() for phase in by} == {"logprob"}
    assert report["calls"]["attention"] == LAYERS
    assert "logprob" in report["head_ms"]["log_prob"]
    text = ct.format_report(report, "log-prob forward")
    assert "attention" in text and "experts" in text and "forward" not in text.split("\n")[1]


def test_removed_timer_leaves_no_hook_and_records_nothing(model_and_batch):
    model, batch = model_and_batch
    counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    timer = ct.ComponentTimer(model, cuda=False)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] != counts
    timer.remove()
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == counts
    bab.train_step(model, batch)  # outside a pass: no span is recorded
    assert timer.spans == []


def test_model_without_gpt_oss_layers_is_refused():
    with pytest.raises(ValueError, match="GptOssDecoderLayer"):
        ct.ComponentTimer(torch.nn.Linear(2, 2), cuda=False)


def test_zero3_fetches_are_timed_in_each_phase_and_deepspeed_restored(model_and_batch):
    import deepspeed
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coord

    model, batch = model_and_batch
    model.float()
    original = Coord.fetch_sub_module
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "bf16": {"enabled": False},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with conftest.one_process_gloo_world():
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3), config=config)
        timer = ct.ComponentTimer(engine, cuda=False, zero3=True)
        assert Coord.fetch_sub_module is not original
        try:
            engine.train()
            with timer.pass_("train"):
                log_probs = bab.actor_log_probs(engine, batch)
                loss = bab.ppo_loss(log_probs, batch)
                timer.loss_ready()
                engine.backward(loss)
            train = timer.report()
            with torch.no_grad(), timer.pass_("logprob"):
                engine.eval()
                bab.actor_log_probs(engine, batch)
            logprob = timer.report()
        finally:
            timer.remove()
    assert Coord.fetch_sub_module is original
    assert set(train["zero3_ms_whole_model"]["zero3_fetch"]) == {"forward", "backward"}
    assert set(train["zero3_ms_whole_model"]["zero3_release"]) >= {"forward", "backward"}
    assert set(logprob["zero3_ms_whole_model"]["zero3_fetch"]) == {"logprob"}
    assert set(train["per_layer_ms"]["attention"]) == {"forward", "recompute", "backward"}


def test_measure_passes_runs_each_pass_and_keeps_the_extra_figures(model_and_batch):
    model, batch = model_and_batch
    timer = ct.ComponentTimer(model, cuda=False)
    after = []
    figures = ct.measure_passes(timer, lambda: bab.train_step(model, batch, timer), lambda: bab.logprob_forward(model, batch),
                                passes=3, after_train=lambda: after.append(bab.zero_grads(model)) or {"step_ms": 2.0 * len(after)})
    timer.remove()
    assert len(after) == 3
    assert figures["train"]["step_ms"] == 4.0  # median of 2, 4, 6
    assert figures["train"]["calls"]["attention"] == 3 * LAYERS  # each pass's count, not a sum
    assert set(figures["train"]["per_layer_ms"]["experts"]) == {"forward", "recompute", "backward"}
    assert {p for by in figures["logprob"]["per_layer_ms"].values() for p in by} == {"logprob"}


def test_median_report_takes_each_number_over_passes():
    reports = [{"a": {"x": 1.0, "y": 5.0}, "n": 3, "label": "t"}, {"a": {"x": 3.0}, "n": 3, "label": "t"},
               {"a": {"x": 2.0, "y": 7.0}, "n": 3, "label": "t"}]
    assert ct.median_report(reports) == {"a": {"x": 2.0, "y": 6.0}, "n": 3, "label": "t"}
