"""rft/fast_gptoss.py: routed experts and sink-aware flex attention give the current path's numbers.

Everything here runs on the CPU, on a tiny gpt-oss built from a config (the sizes of
``tests/tiny_gptoss.py``), against transformers 4.57.6's own code on the same weights:
its ``GptOssExperts`` loop and its ``eager_attention_forward``.

What the CPU can and cannot show:

* flex attention: torch 2.10's compiled flex attention on the CPU supports neither
  training nor returning the log-sum-exp ("torch.compile on CPU only supports inference
  and `return_lse` is not supported yet"), so the fast path runs flex attention
  uncompiled here: PyTorch's reference implementation of the same operator, with the same
  block masks and the same differentiation through the log-sum-exp. The fused CUDA kernels
  are checked on the GPU by ``bench/bench_actor_breakdown.py`` (figures in ``bench/RESULTS.md``).
* routed experts: ``torch._grouped_mm`` runs only on CUDA bf16 here; the CPU fallback
  loops over experts and shares the routing (sort, offsets, weights, un-permute) with the
  GPU path. The offsets' meaning is checked against torch's own CPU ``_grouped_mm`` where
  this torch has one.

Tolerances, measured on this tiny model in float32 (sinks set to ``linspace(-1, 3)``, sharp
attention and routing): log-probs differ by at most 9.5e-7, LoRA gradients by a relative
2.0e-6. The bounds below leave a factor of about ten (log-probs) and fifty (gradients); the
issue's bound for gradients is a relative 1e-2.
"""

from __future__ import annotations

import pytest

import conftest
import torch

from rft import fast_gptoss
from tiny_gptoss import TINY_CONFIG, _random_weights

LOGPROB_TOL = 1e-5
"""Largest |log-prob difference| allowed between the fast path and eager + transformers' experts
(float32; measured 9.5e-7)."""

GRAD_REL_TOL = 1e-4
"""Largest relative L2 difference of any LoRA gradient tensor (float32; measured 2.0e-6; the issue asks 1e-2)."""

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SEQ = 200
"""Tokens per row: two 128-token flex blocks, and more than the tiny sliding window (16)."""

LEFT_PAD = 37
"""Left padding of the second row, as OpenRLHF pads prompts."""


def tiny_model(dtype: torch.dtype = torch.float32, lora: bool = True):
    """Tiny gpt-oss with eager attention, sinks that matter, sharp attention and routing, and LoRA on q/k/v/o
    (B matrices non-zero, so that A has gradients), reentrant checkpointing as the launchers train."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**TINY_CONFIG, attn_implementation="eager"))
    values = _random_weights(model, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = values[name]
            if name.endswith("sinks"):
                value = torch.linspace(-1.0, 3.0, value.numel())
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                value = value * 10  # scores far from uniform
            elif ".router." in name:
                value = value * 20  # decisive top-k
            param.copy_(value)
    model = model.to(dtype)
    return add_lora(model) if lora else model


def add_lora(model):
    """LoRA r8 on q/k/v/o with random B (so that A has gradients), reentrant checkpointing, as the actor trains."""
    from peft import LoraConfig, TaskType, get_peft_model

    model.config.use_cache = False
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def batch() -> dict:
    """Two rows, the second left-padded; position ids as OpenRLHF's Actor makes them (models/actor.py:171-173)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(2, TINY_CONFIG["vocab_size"], (2, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :LEFT_PAD] = 0
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    return {"ids": ids, "mask": mask, "positions": positions, "advantages": torch.randn(2, SEQ - 1, generator=gen)}


def log_probs(model, b: dict) -> torch.Tensor:
    logits = model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=b["positions"]).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, b["ids"][:, 1:, None]).squeeze(-1)


def step(model, b: dict, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs of the real tokens, and (training) the LoRA gradients of a policy-gradient loss."""
    real = b["mask"][:, 1:].bool()
    model.train(train)
    model.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return log_probs(model, b)[real], {}
    lp = log_probs(model, b)
    (-(lp * b["advantages"] * real).sum() / real.sum()).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach()[real], grads


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


# the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, parts", [
    (None, set()), ("", set()), ("0", set()), ("off", set()),
    ("1", set(fast_gptoss.PARTS)), ("all", set(fast_gptoss.PARTS)), ("attention,experts", {"attention", "experts"}),
    ("experts", {"experts"}), ("attention", {"attention"}), (" experts , attention ", {"attention", "experts"}),
])
def test_setting_names_the_parts_installed(value, parts):
    assert fast_gptoss.parse_setting(value) == parts


def test_an_unknown_part_is_refused_with_the_variable_named():
    with pytest.raises(ValueError, match="RFT_FAST_GPTOSS"):
        fast_gptoss.parse_setting("expert")


def test_without_the_setting_the_model_is_left_as_loaded():
    model = tiny_model(lora=False)
    assert fast_gptoss.install_from_env(model, environ={}) == dict.fromkeys(fast_gptoss.PARTS, 0)
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in model.modules())


# RMS norms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_op_rms_norm_equals_transformers_norm_and_its_gradients(dtype):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    torch.manual_seed(0)
    norm = GptOssRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96) * 0.3 + 1)  # fp32, as the actor keeps it
    x = (torch.randn(3, 17, 96) * 4).to(dtype).requires_grad_()
    g = torch.randn(3, 17, 96).to(dtype)

    def run(forward):
        x.grad = norm.weight.grad = None
        out = forward(x)
        out.backward(g)
        return out.detach(), x.grad.clone(), norm.weight.grad.clone()

    ref = run(norm.forward)
    out = run(lambda t: fast_gptoss.rms_norm_forward(norm, t))
    assert out[0].dtype == ref[0].dtype == dtype
    # fp32 arithmetic in both, rounded once to the input dtype: at most one rounding step apart
    step = torch.finfo(dtype).eps
    assert ((out[0].float() - ref[0].float()).abs() <= step * ref[0].float().abs().clamp(min=1)).all()
    for got, want in zip(out[1:], ref[1:]):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < max(step, 1e-6)


def test_norms_part_installs_on_every_norm_and_uninstalls():
    model = tiny_model(lora=False)
    counts = fast_gptoss.install(model, {"norms"})
    assert counts["norms"] == 2 * TINY_CONFIG["num_hidden_layers"] + 1
    fast_gptoss.uninstall(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


# routed experts -----------------------------------------------------------------------------


def test_routing_sorts_pairs_by_expert_and_keeps_token_order_within_one():
    indices = torch.tensor([[2, 0], [0, 3], [3, 2]])  # 3 tokens, top-2 of 5 experts (4 gets none)
    weights = torch.zeros(3, 5).scatter_(1, indices, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]]))
    r = fast_gptoss.route(indices, weights, num_experts=5)
    assert r.expert.tolist() == [0, 0, 2, 2, 3, 3]
    assert r.token.tolist() == [0, 1, 0, 2, 1, 2]
    assert r.weight.tolist() == pytest.approx([0.4, 0.7, 0.6, 0.5, 0.3, 0.5])
    assert r.ends.tolist() == [2, 2, 4, 6, 6] and r.ends.dtype == torch.int32
    assert torch.equal(r.order[r.inverse], torch.arange(6))


def test_offsets_mean_what_grouped_mm_reads():
    """The CUDA path hands ``ends`` to ``torch._grouped_mm``; its CPU build (torch 2.10) reads them the
    same way as the loop, empty experts included."""
    x = torch.randn(7, 16)
    w = torch.randn(4, 16, 8)
    ends = torch.tensor([3, 3, 7, 7], dtype=torch.int32)  # experts 1 and 3 get no rows
    loop = fast_gptoss.expert_matmul(x, w, ends)
    assert torch.allclose(loop, torch.cat([x[:3] @ w[0], x[3:7] @ w[2]]))
    try:
        grouped = torch._grouped_mm(x, w, offs=ends)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"this torch has no CPU torch._grouped_mm ({exc})")
    assert torch.allclose(grouped, loop, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 50])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_routed_experts_equal_transformers_experts(tokens, training, dtype, tol):
    """Output and input gradient (through the routing weights too) against ``GptOssExperts.forward``;
    8 experts top-4, so with one token half of the experts get none. bf16 measured 2.5e-3 / 4.2e-3:
    the k outputs of a token are summed in one rounding, not one per expert."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    config = GptOssConfig(num_local_experts=8, num_experts_per_tok=4, hidden_size=64, intermediate_size=32)
    torch.manual_seed(0)
    experts, router = GptOssExperts(config), GptOssTopKRouter(config)
    for p in [*experts.parameters(), *router.parameters()]:
        torch.nn.init.normal_(p, std=0.5 if p.dim() < 3 else 0.1)
    experts, router = experts.to(dtype).train(training), router.to(dtype)
    x = torch.randn(1, tokens, 64, dtype=dtype, requires_grad=True)
    scores, indices = router(x)
    ref = experts(x, router_indices=indices, routing_weights=scores)
    (ref_grad,) = torch.autograd.grad(ref.float().square().sum(), x, retain_graph=True)
    out = fast_gptoss.routed_experts_forward(experts, x, indices, scores)
    (out_grad,) = torch.autograd.grad(out.float().square().sum(), x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ((out - ref).float().norm() / ref.float().norm()).item() < tol
    assert ((out_grad - ref_grad).float().norm() / ref_grad.float().norm()).item() < tol


# sink-aware flex attention ------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 16], ids=["full", "sliding16"])
def test_sink_flex_attention_equals_eager_attention(window):
    """Without a mask of its own the function builds the causal (sliding) block mask itself."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    heads, kv_heads, seq, dim = 4, 2, 150, 16
    gen = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(1, h, seq, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks = heads // kv_heads, torch.linspace(-1.0, 3.0, heads)
    pos = torch.arange(seq)
    visible = pos[None, :] <= pos[:, None]
    if window:
        visible &= pos[None, :] > pos[:, None] - window
    additive = torch.zeros(seq, seq).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]
    results = []
    for fast in (False, True):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0 * 3, k0, v0))
        if fast:
            out, _ = fast_gptoss.sink_flex_attention_forward(module, q, k, v, None, scaling=dim**-0.5,
                                                              sliding_window=window, s_aux=module.sinks)
        else:
            out, _ = eager_attention_forward(module, q, k, v, additive, scaling=dim**-0.5)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (ref, ref_grads), (out, grads) = results
    assert out.shape == ref.shape == (1, seq, heads, dim)
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)


def test_sinks_rescale_each_row_by_the_sigmoid_of_lse_minus_sink():
    out = torch.ones(1, 2, 3, 4)
    lse = torch.zeros(1, 2, 3)
    scaled = fast_gptoss.apply_sinks(out, lse, torch.tensor([0.0, float("-inf")]))
    assert torch.allclose(scaled[0, 0], torch.full((3, 4), 0.5))  # the sink weighs as much as the keys
    assert torch.equal(scaled[0, 1], out[0, 1])  # a sink of -inf takes nothing
    masked = fast_gptoss.apply_sinks(torch.zeros(1, 1, 1, 4), torch.full((1, 1, 1), float("-inf")), torch.zeros(1))
    assert torch.equal(masked, torch.zeros(1, 1, 1, 4))  # a row with every key masked stays zero, no NaN


def test_sliding_layers_visit_only_the_blocks_of_their_window():
    """Linear cost: with the 128-token blocks of flex attention, a 16-token window touches at most two
    key blocks per query block, where the causal mask of a full layer touches all earlier ones."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    seq = 1024
    cache_position = torch.arange(seq)
    sliding = fast_gptoss.sink_block_mask(1, cache_position, seq, mask_function=sliding_window_causal_mask_function(16))
    full = fast_gptoss.sink_block_mask(1, cache_position, seq, mask_function=causal_mask_function)
    sliding_blocks = sliding.kv_num_blocks + (sliding.full_kv_num_blocks if sliding.full_kv_num_blocks is not None else 0)
    full_blocks = full.kv_num_blocks + (full.full_kv_num_blocks if full.full_kv_num_blocks is not None else 0)
    assert sliding_blocks.max().item() <= 2
    assert full_blocks.flatten().tolist() == list(range(1, seq // 128 + 1))


def test_registered_name_is_selectable_like_transformers_attention():
    from transformers import GptOssConfig, GptOssForCausalLM

    name = fast_gptoss.register_attention()
    for impl in (name, "eager"):
        model = GptOssForCausalLM._from_config(GptOssConfig(**TINY_CONFIG), attn_implementation=impl)
        assert model.config._attn_implementation == impl
        assert model(torch.randint(2, 512, (1, 40))).logits.isfinite().all()


# the whole model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_fast_path_log_probs_and_lora_grads_equal_eager_with_transformers_experts():
    model, b = tiny_model(), batch()
    ref_eval, _ = step(model, b, train=False)
    ref_train, ref_grads = step(model, b, train=True)
    assert fast_gptoss.install(model) == {"experts": 2, "attention": 1, "norms": 5, "leaves": 0,
                                         "resident": 0}  # no ZeRO-3; 2 norms a layer + the final one
    out_eval, _ = step(model, b, train=False)
    out_train, grads = step(model, b, train=True)
    assert (out_eval - ref_eval).abs().max().item() < LOGPROB_TOL
    assert (out_train - ref_train).abs().max().item() < LOGPROB_TOL
    assert max_rel(grads, ref_grads) < GRAD_REL_TOL


@pytest.mark.slow
def test_dropping_the_sinks_breaks_parity(monkeypatch):
    """The parity above would catch a fast path that forgot the sinks: without them the log-probs move
    by about 0.12, ten thousand times the tolerance."""
    model, b = tiny_model(), batch()
    ref, _ = step(model, b, train=False)
    fast_gptoss.install(model)
    monkeypatch.setattr(fast_gptoss, "apply_sinks", lambda out, lse, sinks: out)
    dropped, _ = step(model, b, train=False)
    assert (dropped - ref).abs().max().item() > 1000 * LOGPROB_TOL


@pytest.mark.slow
def test_uninstall_gives_back_the_transformers_paths_bit_for_bit():
    model, b = tiny_model(), batch()
    before, _ = step(model, b, train=False)
    fast_gptoss.install(model)
    assert model.config._attn_implementation == fast_gptoss.FAST_ATTN_IMPLEMENTATION
    assert not any("rft" in key for key in model.config.to_dict())  # nothing of ours reaches config.json
    fast_gptoss.uninstall(model)
    assert model.config._attn_implementation == "eager"
    after, _ = step(model, b, train=False)
    assert torch.equal(before, after)


def test_install_from_env_installs_what_the_setting_names():
    model = tiny_model(lora=False)
    counts = fast_gptoss.install_from_env(model, environ={fast_gptoss.SETTING: "experts"})
    assert counts == {"experts": 2, "attention": 0, "norms": 0, "leaves": 0, "resident": 0}
    assert model.config._attn_implementation == "eager"
    fast_gptoss.uninstall(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


# the actor's hook (patches/actor.patch) -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bf16_ckpt(tmp_path_factory):
    from tiny_gptoss import build_tiny_gptoss

    return build_tiny_gptoss(tmp_path_factory.mktemp("fast-gptoss") / "ckpt", mxfp4=False)


@pytest.mark.slow
@pytest.mark.parametrize("value, experts, attention", [
    (None, False, False), ("0", False, False), ("1", True, True), ("experts", True, False),
])
def test_patched_actor_installs_the_fast_paths_only_when_asked(
    patched_root, tiny_bf16_ckpt, monkeypatch, capsys, value, experts, attention
):
    """The real patched ``Actor`` (LoRA on q/k/v/o) with ``RFT_FAST_GPTOSS`` unset, 0, 1 and ``experts``;
    the hook runs before LoRA wraps the model, and nothing else of the load changes."""
    import oprl
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    if value is None:
        monkeypatch.delenv(fast_gptoss.SETTING, raising=False)
    else:
        monkeypatch.setenv(fast_gptoss.SETTING, value)
    actor_mod = oprl.load(patched_root, "openrlhf.models.actor")
    actor = actor_mod.Actor(str(tiny_bf16_ckpt.path), attn_implementation="eager", param_dtype="bf16",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_rank=4, lora_alpha=8)
    experts_modules = [m for m in actor.model.modules() if isinstance(m, GptOssExperts)]
    assert len(experts_modules) == TINY_CONFIG["num_hidden_layers"]
    assert all(("forward" in m.__dict__) == experts for m in experts_modules)
    expected = fast_gptoss.FAST_ATTN_IMPLEMENTATION if attention else "eager"
    assert actor.model.config._attn_implementation == expected
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rft fast gpt-oss")]
    layers = TINY_CONFIG["num_hidden_layers"]
    assert logged == {  # no ZeRO-3 here: leaves and resident take nowhere
        "1": [f"rft fast gpt-oss (RFT_FAST_GPTOSS=1): attention 1, experts {layers}, norms {2 * layers + 1}, "
              "leaves 0, resident 0"],
        "experts": [f"rft fast gpt-oss (RFT_FAST_GPTOSS=experts): attention 0, experts {layers}, norms 0, "
                    "leaves 0, resident 0"],
    }.get(value, [])
    # the model, not Actor.forward: its log-probs go through flash-attn's Triton cross entropy, GPU only
    ids = torch.randint(2, TINY_CONFIG["vocab_size"], (1, 24))
    assert actor.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.isfinite().all()


# ZeRO-3: layer leaves and resident frozen weights ------------------------------------------------


@pytest.fixture(scope="module")
def gloo_world():
    """A one-process gloo group on DeepSpeed's CPU accelerator: what ZeRO-3 needs to partition and train."""
    with conftest.one_process_gloo_world():
        yield


def openrlhf_ds_configs(root) -> dict[str, dict]:
    """OpenRLHF 0.9.3's own train and eval DeepSpeed configs (ZeRO-3, fp32 so that parity is exact, zpg 1 as
    its strategy passes by default), from its ``deepspeed_utils.py`` loaded by file path, with the batch sizes
    its strategy adds."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_oprl_ds_utils", root / "openrlhf" / "utils" / "deepspeed" / "deepspeed_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    sizes = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1}
    train = utils.get_train_ds_config(offload=False, adam_offload=False, stage=3, param_dtype="fp32", zpg=1)
    evaluate = utils.get_eval_ds_config(offload=False, stage=3, param_dtype="fp32")
    configs = {"train": {**train, **sizes}, "eval": {**evaluate, **sizes}}
    for config in configs.values():
        # every tiny weight is under DeepSpeed's default threshold (1e5 elements), below which it keeps
        # weights whole by itself; gpt-oss's are far above it. 0: DeepSpeed keeps none whole here either.
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return configs


def zero3_step(ds_config: dict, parts: set[str], environ: dict[str, str]):
    """What the patched actor does, on the tiny gpt-oss: partition under a live HfDeepSpeedConfig, the hook
    (:func:`fast_gptoss.install`), LoRA, ``deepspeed.initialize``; then one PPO-style training micro step.

    Returns the install counts, the log-probs and gathered LoRA gradients of the first micro step, the
    engine and the base layer parameters (as a second micro step left them)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    model, b = tiny_model(lora=False), batch()
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841 - alive while the hook runs, as in the actor
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    counts = fast_gptoss.install(model, parts, environ)
    unset_hf_deepspeed_config()
    base = fast_gptoss.frozen_layer_params(model)
    model = add_lora(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3), config=ds_config)
    real = b["mask"][:, 1:].bool()
    engine.train()
    lp = log_probs(engine, b)
    engine.backward(-(lp * b["advantages"] * real).sum() / real.sum())
    grads = {n: safe_get_full_grad(p).float().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    # a second micro step: the first records DeepSpeed's module trace and releases everything it
    # gathered (partitioned_param_coordinator.py release_sub_module); from the second on the trace
    # decides, and it leaves persisted parameters whole
    engine.backward(-(log_probs(engine, b) * b["advantages"] * real).sum() / real.sum())
    return counts, lp.detach()[real], grads, engine, base


@pytest.mark.slow
def test_zero3_layer_leaves_and_resident_weights_train_like_plain_zero3(gloo_world, pristine_root):
    """Under OpenRLHF's train config the hook makes each layer one ZeRO-3 unit and keeps its base weights
    gathered through forward, recompute and backward, and the log-probs and LoRA gradients are those of
    ZeRO-3 without either, and of the same model without DeepSpeed."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    configs = openrlhf_ds_configs(pristine_root)
    fast = {"attention", "experts"}
    counts0, lp0, grads0, engine0, base0 = zero3_step(configs["train"], fast, {})
    counts1, lp1, grads1, engine1, base1 = zero3_step(configs["train"], set(fast_gptoss.PARTS),
                                                      {fast_gptoss.RESIDENT_SETTING: "1"})
    layers = TINY_CONFIG["num_hidden_layers"]
    assert counts0 == {"experts": layers, "attention": 1, "norms": 0, "leaves": 0, "resident": 0}
    assert counts1 == {"experts": layers, "attention": 1, "norms": 2 * layers + 1, "leaves": layers,
                       "resident": len(base1)}
    layer_modules = [m for m in engine1.module.modules() if type(m).__name__ == "GptOssDecoderLayer"]
    assert len(layer_modules) == layers and all(m._z3_leaf for m in layer_modules)
    # after the micro steps, plain ZeRO-3 has released the base weights (all but the layers' sinks,
    # which DeepSpeed 0.18.5 leaves gathered here); the resident ones are all still whole
    assert sum(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in base0) >= len(base0) - layers
    assert all(p.ds_status == ZeroParamStatus.AVAILABLE and p.ds_persist for p in base1)
    assert (lp1 - lp0).abs().max().item() < LOGPROB_TOL
    assert max_rel(grads1, grads0) < GRAD_REL_TOL
    plain = tiny_model()
    fast_gptoss.install(plain, fast)
    lp_plain, grads_plain = step(plain, batch(), train=True)
    assert (lp1 - lp_plain).abs().max().item() < LOGPROB_TOL
    assert max_rel(grads1, grads_plain) < GRAD_REL_TOL


@pytest.mark.slow
def test_frozen_weights_stay_partitioned_for_eval_configs_and_beyond_the_budget(gloo_world, pristine_root):
    """The reference model (eval config) and a model larger than the budget keep ZeRO-3's partitions;
    a budget that is not a number is refused with the variable named."""
    configs = openrlhf_ds_configs(pristine_root)
    parts = set(fast_gptoss.PARTS)
    counts, *_ = zero3_step(configs["eval"], parts, {fast_gptoss.RESIDENT_SETTING: "1"})
    assert counts["leaves"] == TINY_CONFIG["num_hidden_layers"] and counts["resident"] == 0
    counts, *_ = zero3_step(configs["train"], parts, {fast_gptoss.RESIDENT_SETTING: "0"})
    assert counts["resident"] == 0
    with pytest.raises(ValueError, match=fast_gptoss.RESIDENT_SETTING):
        zero3_step(configs["train"], parts, {fast_gptoss.RESIDENT_SETTING: "lots"})
