"""Two ZeRO-3 ranks on CPU: ``tests/gpu/two_rank_zero3.py`` under torchrun with gloo.

The script is the one meant for a two-GPU host; here it runs with ``--backend gloo``
on DeepSpeed's CPU accelerator, in real separate processes started by torchrun. It runs
twice: one rank (the single-process reference, ``python -m torch.distributed.run`` on the
patched OpenRLHF 0.9.3 tree of the ``patched_root`` fixture, ``--tree``), then two ranks
with the README's command, ``torchrun --standalone --nproc_per_node 2
tests/gpu/two_rank_zero3.py --out DIR --backend gloo`` (plus ``--reference`` pointing at
the first run), where each rank copies the installed pristine 0.9.3 and applies
``patches/series`` itself. Inside the workers, the script replaces only OpenRLHF's three
CUDA calls outside any patch (``torch.cuda.set_device``, ``torch.cuda.synchronize``, the
``"cuda"`` device mesh), hides flash-attn's Triton cross-entropy kernel (OpenRLHF falls
back to its own log-probs), and installs the stand-ins of ``tests/conftest.py`` for vLLM's
import boundary and flash-attn's CUDA extension; everything else is the real code.

What the groups prove:

* helpers (fast): each check of the script can fail: a payload differing in one
  byte or one index entry, a wrong partition size, a full-model file beside the
  adapter, a missing launcher environment;
* two ranks (slow): the MXFP4 checkpoint is loaded by the patched Actor and
  partitioned so that each rank holds ceil(numel/2) of every parameter, and gathered
  it is the decoded checkpoint bit for bit; training steps run; the LoRA gather of the
  weight sync sees every LoRA tensor partitioned, then whole in one context; the packed
  payload of two ranks equals that of one rank bit for bit; the patched save_model
  writes the adapter and no full-model file, and the saved adapter equals the payload;
  the patched save_ckpt leaves every frozen weight out of each rank's files, and
  load_ckpt brings the saved adapter back bit for bit after one more step.

DeepSpeed builds its CPU ops (FusedAdam, shared-memory comm) once per machine on first
use (a few minutes on two cores; cached under ~/.cache/torch_extensions); the two runs
then take about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import two_rank_zero3 as z3  # noqa: E402

SCRIPT = Path(z3.__file__).resolve()
REPO = SCRIPT.parents[2]


# ----------------------------------------------------------------------------- helpers


def _payload(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict]:
    """A payload folder as the script writes it, made with the same layout rules (64-byte aligned)."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        entries.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, len(raw)])
        padded = raw + b"\0" * (-len(raw) % 64)
        chunks.append(padded)
        offset += len(padded)
    buffer = b"".join(chunks)
    index = {"format": "rft-lora-delta/1", "entries": entries, "targets": [["model.q.weight", 2.0]]}
    (tmp_path / z3.PAYLOAD_NAME).write_bytes(buffer)
    (tmp_path / z3.PAYLOAD_INDEX_NAME).write_text(json.dumps(index))
    return buffer, index


def test_payload_comparison_names_the_first_differing_tensor(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.q.weight:{k}": torch.randn(8, 64, generator=gen).to(torch.bfloat16) for k in "AB"}
    buffer, index = _payload(tmp_path, tensors)

    same = z3.compare_payloads(tmp_path, buffer, json.loads(json.dumps(index)))
    assert same["status"] == z3.PASSED and same["sha256"] == z3.payload_digest(buffer)

    flipped = bytearray(buffer)
    flipped[index["entries"][1][3] + 5] ^= 0x01  # one bit of lora_B
    result = z3.compare_payloads(tmp_path, bytes(flipped), index)
    assert result["status"] == z3.FAILED and result["detail"].startswith("model.q.weight:B: 1 of 1024 bytes")

    other_shape = json.loads(json.dumps(index))
    other_shape["entries"][0][2] = [64, 8]
    assert z3.compare_payloads(tmp_path, buffer, other_shape)["status"] == z3.FAILED
    other_scale = dict(index, targets=[["model.q.weight", 4.0]])
    assert "scales" in z3.compare_payloads(tmp_path, buffer, other_scale)["detail"]


@pytest.mark.parametrize(
    ("numel", "world", "share"), [(512, 2, 256), (513, 2, 257), (1, 2, 1), (0, 2, 0), (10, 1, 10), (10, 4, 3)]
)
def test_share_is_deepspeeds_padded_partition(numel, world, share):
    assert z3.expected_share(numel, world) == share


def test_partition_report_flags_a_rank_holding_too_much():
    good = [("a", 512, 256), ("b", 513, 257)]
    report = z3.partition_report(good, 2)
    assert report["wrong_share"] == [] and report["local_numel"] == 513 and report["model_numel"] == 1025
    assert report["local_fraction"] == pytest.approx(513 / 1025)
    whole = z3.partition_report([("a", 512, 512), ("b", 513, 257)], 2)  # "a" not partitioned
    assert whole["wrong_share"] == ["a"]


def test_adapter_report_finds_full_model_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_text("{}")
    report = z3.adapter_only_report(tmp_path)
    assert report["full_model_files"] == [] and report["adapter_weight_files"] == ["adapter_model.bin"]
    assert report["bytes_written"] == 104 and report["has_adapter_config"]

    for leak in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        (tmp_path / leak).write_bytes(b"y" * 10)
    report = z3.adapter_only_report(tmp_path)
    assert report["full_model_files"] == sorted(
        ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    )
    assert report["bytes_written"] == 134


def test_checkpoint_inspection_finds_frozen_weights(tmp_path):
    trainable = {"base_model.model.q.lora_A.default.weight", "base_model.model.q.lora_B.default.weight"}
    clean = {"module": {name: torch.zeros(2) for name in trainable}, "buffer_names": ["rotary.inv_freq"],
             "frozen_param_fragments": None}
    clean["module"]["rotary.inv_freq"] = torch.ones(2)
    (tmp_path / "step").mkdir()
    torch.save(clean, tmp_path / "step" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    report = z3.inspect_ds_checkpoint(tmp_path, trainable)
    assert report["frozen_leaks"] == [] and list(report["files"]) == ["step/zero_pp_rank_0_mp_rank_00_model_states.pt"]

    # what DeepSpeed writes without exclude_frozen_parameters: the frozen weights and each rank's fragment
    leaky = dict(clean, module={**clean["module"], "base_model.model.q.base_layer.weight": torch.zeros(0)},
                 frozen_param_fragments={"base_model.model.q.base_layer.weight": torch.zeros(8)})
    torch.save(leaky, tmp_path / "step" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    report = z3.inspect_ds_checkpoint(tmp_path, trainable)
    assert report["frozen_leaks"] == [
        "step/zero_pp_rank_1_mp_rank_00_model_states.pt: 1 frozen module entries",
        "step/zero_pp_rank_1_mp_rank_00_model_states.pt: 1 frozen fragments",
    ]
    assert report["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "step").iterdir())


def test_exit_status_orders_failed_over_not_run():
    assert z3.exit_status({"a": {"status": z3.PASSED}, "b": {"status": z3.SKIPPED}}) == 0
    assert z3.exit_status({"a": {"status": z3.NOT_RUN}, "b": {"status": z3.PASSED}}) == 3
    assert z3.exit_status({"a": {"status": z3.NOT_RUN}, "b": {"status": z3.FAILED}}) == 1


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=120)


def test_help_and_one_line_errors(tmp_path):
    helped = _script("--help")
    assert helped.returncode == 0 and "--reference" in helped.stdout and "torchrun" in helped.stdout

    outside = _script("--backend", "gloo", "--out", str(tmp_path / "out"))
    assert outside.returncode == 2
    assert outside.stderr.strip().splitlines() == [
        f"two_rank_zero3.py: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set: launch with "
        f"torchrun --standalone --nproc_per_node 2 {SCRIPT} ..."
    ]
    launched = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    no_ref = _script("--backend", "gloo", "--out", str(tmp_path / "out"), "--reference", str(tmp_path), env=launched)
    assert no_ref.returncode == 2 and len(no_ref.stderr.strip().splitlines()) == 1
    assert f"--reference {tmp_path}: no {z3.PAYLOAD_NAME}" in no_ref.stderr
    wrong_accel = _script("--backend", "gloo", "--out", str(tmp_path / "out"), env={**launched, "DS_ACCELERATOR": "cuda"})
    assert wrong_accel.returncode == 2 and "DS_ACCELERATOR=cuda; unset it" in wrong_accel.stderr
    bad_threshold = _script("--out", str(tmp_path), "--persistence-threshold", "many")
    assert bad_threshold.returncode == 2 and "give an integer or 'auto'" in bad_threshold.stderr


# ----------------------------------------------------------------------------- two ranks


README_COMMAND = "torchrun --standalone --nproc_per_node 2 tests/gpu/two_rank_zero3.py --out DIR --backend gloo"
"""The two-rank CPU run as the README gives it (its --out folder in place of DIR)."""


def _launch(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run a torchrun command line from the repository root; returns it and its wall time (monotonic)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    return proc, time.monotonic() - started


@pytest.fixture(scope="module")
def runs(patched_root, tmp_path_factory):
    """The world-size-1 reference run on the ``patched_root`` tree, then the README's two-rank run
    (the torchrun of this environment) compared with it."""
    base = tmp_path_factory.mktemp("two-rank")
    one = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(SCRIPT),
           "--backend", "gloo", "--out", str(base / "ws1"), "--tree", str(patched_root)]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = [torchrun, *README_COMMAND.replace("DIR", str(base / "ws2")).split()[1:], "--reference", str(base / "ws1")]
    results = {}
    for nproc, cmd in ((1, one), (2, two)):
        out = base / f"ws{nproc}"
        proc, wall_s = _launch(cmd)
        assert proc.returncode == 0, f"world size {nproc} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        results[nproc] = {"out": out, "json": json.loads((out / z3.RESULT_NAME).read_text()), "log": proc.stdout,
                          "wall_s": wall_s}
    return results


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    """The payload's tensors, read independently of the script (index entry: name, dtype, shape, offset, nbytes)."""
    buffer = bytearray((out / z3.PAYLOAD_NAME).read_bytes())
    index = json.loads((out / z3.PAYLOAD_INDEX_NAME).read_text())
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    return {name: raw[off : off + n].view(getattr(torch, dtype)).view(shape) for name, dtype, shape, off, n in index["entries"]}


@pytest.mark.slow
def test_every_check_passes_on_two_ranks(runs):
    two, one = runs[2]["json"], runs[1]["json"]
    assert two["world_size"] == 2 and two["backend"] == "gloo" and two["exit_status"] == 0
    assert {name: c["status"] for name, c in two["checks"].items()} == dict.fromkeys(
        z3.CHECKS, z3.PASSED)
    for name in z3.CHECKS:
        ranks = [0] if name in ("save_adapter_only", "payload_vs_reference") else [0, 1]
        assert two["checks"][name]["ranks"] == ranks, name
    assert one["checks"]["partition_share"]["status"] == z3.SKIPPED  # one rank partitions nothing
    assert one["checks"]["payload_vs_reference"]["status"] == z3.SKIPPED
    assert two["series"] == one["series"] and "actor.patch" in two["series"]
    # only the import boundaries, and flash-attn's Triton kernel (OpenRLHF's own fallback runs instead)
    assert set(two["import_stand_ins"]) <= {"flash_attn_2_cuda", "vllm", "flash_attn.ops.triton.cross_entropy"}
    assert one["tree"] is not None and one["applied_here"] == []  # the patched_root tree, given with --tree


@pytest.mark.slow
def test_the_readme_command_runs_on_cpu(runs):
    """The README's two-rank CPU command: each rank patches its own copy with patches/series, and
    rank 0 writes the results, the payload, the adapter, the DeepSpeed checkpoint and the plot."""
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "torchrun --standalone --nproc_per_node 2 tests/gpu/two_rank_zero3.py --out" in readme
    assert "`--backend gloo`" in readme
    two, out = runs[2]["json"], runs[2]["out"]
    series = [line.strip() for line in (REPO / "patches" / "series").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert two["tree"] is None and two["applied_here"] == series == two["series"]
    assert two["format"] == z3.RESULT_FORMAT and two["exit_status"] == 0 and two["world_size"] == 2
    assert {n: c["status"] for n, c in two["checks"].items()} == dict.fromkeys(z3.CHECKS, z3.PASSED)
    written = {p.name for p in out.iterdir()}
    assert {z3.RESULT_NAME, z3.PLOT_NAME, z3.PAYLOAD_NAME, z3.PAYLOAD_INDEX_NAME, z3.ADAPTER_DIR, z3.DS_CKPT_DIR} <= written
    index = json.loads((out / z3.PAYLOAD_INDEX_NAME).read_text())
    end = max(offset + nbytes for _, _, _, offset, nbytes in index["entries"])
    assert end <= (out / z3.PAYLOAD_NAME).stat().st_size == two["payload"]["nbytes"]


@pytest.mark.slow
def test_each_rank_holds_half_of_every_parameter(runs):
    ranks = runs[2]["json"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        part = r["partition"]
        assert part["persistent"] == 0  # --persistence-threshold 0: nothing kept whole
        assert part["model_numel"] <= 2 * part["local_numel"] <= part["model_numel"] + part["params"]
        assert part["local_fraction"] == pytest.approx(0.5, abs=1e-3)
    one = runs[1]["json"]["ranks"][0]["partition"]
    assert one["local_numel"] == one["model_numel"] == ranks[0]["partition"]["model_numel"]


@pytest.mark.slow
def test_two_rank_payload_equals_the_single_process_one_bitwise(runs):
    one, two = runs[1]["out"], runs[2]["out"]
    assert (two / z3.PAYLOAD_NAME).read_bytes() == (one / z3.PAYLOAD_NAME).read_bytes()
    assert (two / z3.PAYLOAD_INDEX_NAME).read_text() == (one / z3.PAYLOAD_INDEX_NAME).read_text()
    tensors = _tensors(two)
    layers = runs[2]["json"]["settings"]["checkpoint_config"]["num_hidden_layers"]
    assert len(tensors) == 2 * 4 * layers and all(t.dtype == torch.bfloat16 for t in tensors.values())
    # training moved the adapter: PEFT starts lora_B at 0, the two steps made every one non-zero
    assert all(t.count_nonzero() > 0 for name, t in tensors.items() if name.endswith(":B"))
    q_a = tensors["model.layers.0.self_attn.q_proj.weight:A"]
    assert tuple(q_a.shape) == (8, 64)


@pytest.mark.slow
def test_save_writes_the_adapter_only(runs):
    out = runs[2]["out"]
    save = runs[2]["json"]["save"]
    files = {str(p.relative_to(out / z3.ADAPTER_DIR)): p.stat().st_size for p in (out / z3.ADAPTER_DIR).rglob("*") if p.is_file()}
    assert files == save["files"] and sum(files.values()) == save["bytes_written"]
    assert not [f for f in files if f.endswith((".safetensors", ".index.json")) or f.startswith("pytorch_model")]
    assert "adapter_config.json" in files and "adapter_model.bin" in files
    assert files["adapter_model.bin"] < save["model_bytes"] / 10  # the adapter, not the model
    saved = torch.load(out / z3.ADAPTER_DIR / "adapter_model.bin", map_location="cpu", weights_only=True)
    payload = {}
    for name, tensor in _tensors(out).items():  # "<module>.weight:A" -> PEFT's "<module>.lora_A.weight"
        weight, kind = name.rsplit(":", 1)
        payload[f"base_model.model.{weight.removesuffix('.weight')}.lora_{kind}.weight"] = tensor
    assert set(saved) == set(payload)
    assert all(torch.equal(saved[k], payload[k]) for k in saved)


@pytest.mark.slow
def test_ds_checkpoint_holds_no_frozen_weight_and_resumes_exactly(runs):
    ckpt = runs[2]["json"]["ds_checkpoint"]
    assert ckpt["frozen_leaks"] == []
    model_states = sorted(f for f in ckpt["files"] if f.endswith("model_states.pt"))
    assert [Path(f).name for f in model_states] == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
    assert "changed the adapter, load_ckpt brought back the saved one bitwise" in runs[2]["json"]["checks"][
        "ds_checkpoint_resume"]["detail"]
    model_bytes = runs[2]["json"]["save"]["model_bytes"]
    assert all(ckpt["files"][f] < model_bytes / 10 for f in model_states)  # no rank holds the base model


@pytest.mark.slow
def test_figures_are_reported_per_rank(runs):
    result = runs[2]["json"]
    steps = result["settings"]["steps"]
    for r in result["ranks"]:
        assert len(r["step_s"]) == steps
        timed = [*r["step_s"], *(r[key] for key in ("load_s", "prepare_s", "gather_s", "pack_s", "save_s",
                                                     "ckpt_save_s", "ckpt_load_s"))]
        # one rank's stages run one after another inside the run: together they fit in its wall
        # time, taken here around torchrun (a stage timed in other units or twice would not)
        assert all(s > 0 for s in timed) and sum(timed) <= runs[2]["wall_s"], (timed, runs[2]["wall_s"])
        assert r["peak_memory_source"] == "ru_maxrss" and r["peak_memory_bytes"] > 100 * 2**20
    assert result["payload"]["nbytes"] == (runs[2]["out"] / z3.PAYLOAD_NAME).stat().st_size
    assert len(result["loss"]) == len(result["grad_norm"]) == steps
    assert "results in" in runs[2]["log"]
    png = runs[2]["out"] / z3.PLOT_NAME
    assert f"figures drawn in {png}" in runs[2]["log"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
