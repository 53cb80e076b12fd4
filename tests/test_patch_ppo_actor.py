"""Canaries for the 0.9.3 lines of ``trainer/ray/ppo_actor.py`` that ppo_actor.patch and
metrics_actor.patch hook into, and the call sites the patched file holds.

What the hooks do is tested in ``tests/test_hook_lora_sync.py`` and ``tests/test_hook_actor_stats.py``;
the patched trainer runs in ``tests/test_lora_sync.py`` and ``tests/test_metrics_patches.py``.
"""

from __future__ import annotations

import oprl

FILE = "openrlhf/trainer/ray/ppo_actor.py"

# ppo_actor.patch: where the NCCL group is created, the full-weight sync, and the Ray method around it
SYNC_LINES = (
    "        if backend == \"nccl\" and self.args.colocate_all_models and not self.args.async_train:\n"
    "            self.use_cuda_ipc = True\n",
    "        if self.vllm_engines is not None and not self.use_cuda_ipc and torch.distributed.get_rank() == 0:\n",
    "    def broadcast_to_vllm(self):\n        use_prefix_cache = getattr(self.strategy.args, \"enable_prefix_caching\", False)\n"
    "        cache_reset_refs = []\n",
    "        torch.cuda.empty_cache()\n        torch_dist_barrier_and_cuda_sync()\n\n\n@ray.remote(num_gpus=1)\n",
    "    def broadcast_to_vllm(self):\n        self.trainer.broadcast_to_vllm()\n",
)
# metrics_actor.patch: the mean reduction of ppo_train, and the backward and optimizer steps of training_step
STEP_LINES = (
    "        status_list = []\n        status_mean = {}\n        for epoch in range(self.max_epochs):\n",
    "            for k in status_mean.keys():\n                status_mean[k] /= len(status_list)\n        return status_mean\n",
    "        self.strategy.backward(loss, self.actor, self.actor_optim)\n"
    "        if self.args.use_dynamic_batch:\n"
    "            if self.replay_buffer.dynamic_optimizer_step[step]:\n"
    "                self.strategy.optimizer_step(self.actor_optim, self.actor, self.actor_scheduler, name=\"actor\")\n"
    "        else:\n"
    "            self.strategy.optimizer_step(self.actor_optim, self.actor, self.actor_scheduler, name=\"actor\")\n",
)


def test_canary_pristine_weight_sync_hooks():
    """If this fails, upstream changed how ActorPPOTrainer syncs weights to vLLM: remake ppo_actor.patch,
    or retire it if OpenRLHF now syncs a LoRA policy under base-model names and returns what it did."""
    source = (oprl.SITE / FILE).read_text()
    for lines in SYNC_LINES:
        assert source.count(lines) == 1, lines
    sync = source[source.index("    def broadcast_to_vllm(self):\n") : source.index("@ray.remote(num_gpus=1)")]
    assert "lora" not in sync.lower()  # 0.9.3 sends a PEFT model's parameters like any other's


def test_canary_pristine_step_statistics_hooks():
    """If this fails, upstream changed ppo_train or training_step: remake metrics_actor.patch, or retire
    it if OpenRLHF now reduces maxima with max and logs the grad norm of each optimizer step."""
    source = (oprl.SITE / FILE).read_text()
    for lines in STEP_LINES:
        assert source.count(lines) == 1, lines
    assert "get_global_grad_norm" not in source


def test_patched_file_calls_the_hooks(patched_root):
    source = (patched_root / FILE).read_text()
    assert "from rft.openrlhf.lora_sync import LoraSync" in source
    assert "from rft.openrlhf.actor_stats import ActorStepMetrics" in source
    assert source.count("self.lora_sync = LoraSync.for_run(self.args, self.use_cuda_ipc)") == 1
    assert source.count("return self.lora_sync.broadcast(") == 1
    assert source.count("return self.trainer.broadcast_to_vllm()") == 1
    assert source.count("self.step_metrics.add_micro_batch(") == 1
    assert source.count("self.step_metrics.optimizer_stepped(self.actor.model)") == 2  # both optimizer-step branches
    assert source.count("status_mean.update(self.step_metrics.finalize())") == 1
