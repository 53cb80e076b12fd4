"""train_grpo_20b.sh / train_grpo_120b.sh, driven through --dry-run and fake tools in temp dirs.

The command a launcher prints is parsed by OpenRLHF 0.9.3's real ``train_ppo_ray`` parser and
validation, taken from the tree with ``patches/series`` applied (``tests/parser_util.py``), and
the parsed values are compared with the intended ones: the notes' hyperparameter table,
with the deviations the launchers document. Checks are made to fail one at a time on this
machine, which has no GPU, no data and no patched OpenRLHF: every tool the launcher calls
(apply_patches.sh, nvidia-smi, ray) is replaced by a small script in a temp dir.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import oprl
from parser_util import build_train_parser, parse_train_args

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = {"20b": REPO / "train_grpo_20b.sh", "120b": REPO / "train_grpo_120b.sh"}
REWARD = str(REPO / "reward_func_em.py")
MODULE = "openrlhf.cli.train_ppo_ray"

# What each run is meant to be: the notes' table, except MAX_SAMPLES, the warmup and the 120b's
# episodes, the launchers' documented changes that fit the default run in about 4 days
# (4000 updates, 500 rollouts) with an LR schedule the pre-flight accepts.
INTENDED = {
    "20b": dict(pretrain="openai/gpt-oss-20b", actor_learning_rate=5e-7, init_kl_coef=0.001,
                lora_rank=32, lora_alpha=64, rollout_batch_size=16, train_batch_size=16,
                generate_max_len=4096, lr_warmup_ratio=0.01, num_episodes=20, max_samples=400,
                offload=False, adam_offload=False),
    "120b": dict(pretrain="openai/gpt-oss-120b", actor_learning_rate=1e-6, init_kl_coef=0.0,
                 lora_rank=64, lora_alpha=128, rollout_batch_size=8, train_batch_size=8,
                 generate_max_len=3072, lr_warmup_ratio=0.01, num_episodes=10, max_samples=400,
                 offload=True, adam_offload=True),
}
SHARED = dict(
    advantage_estimator="dr_grpo", zero_stage=3, param_dtype="bf16", attn_implementation="eager",
    gradient_checkpointing=True, gradient_checkpointing_use_reentrant=True,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    actor_num_nodes=1, actor_num_gpus_per_node=4, ref_num_nodes=1, ref_num_gpus_per_node=4,
    colocate_actor_ref=True, vllm_gpu_memory_utilization=0.85, vllm_num_engines=2,
    vllm_tensor_parallel_size=2, vllm_sync_with_ray=True, remote_rm_url=[REWARD],
    input_key="input", label_key="label", apply_chat_template=True, n_samples_per_prompt=8,
    micro_train_batch_size=1, micro_rollout_batch_size=8, prompt_max_len=1024, max_epochs=1,
    eps_clip=0.1, eps_clip_low_high=(0.1, 0.1), entropy_loss_coef=0.0,
    lr_scheduler="cosine_with_min_lr", eval_temperature=0.0, eval_n_samples_per_prompt=1,
    eval_steps=5, save_hf_ckpt=True, disable_ds_ckpt=True, max_ckpt_num=3,
    packing_samples=False, critic_pretrain=None,
)


# ---- the test bed ------------------------------------------------------------------------
def _script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _jsonl(path: Path, rows: int, keys=("input", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: f"{k}{i}" for k in keys}) + "\n" for i in range(rows)))
    return path


class Bed:
    """Temp dirs, data and fake tools for one launcher run."""

    def __init__(self, root: Path, openrlhf_root: Path):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        data = root / "data"
        self.pool = _jsonl(data / "sft_rl_pool.jsonl", 500)
        self.pool400 = _jsonl(data / "sft_rl_pool_400.jsonl", 400)
        self.eval = _jsonl(data / "probe_set_200_ood.jsonl", 202)
        self.patches = _script(root / "apply_patches.sh",
                               'echo "offload_cli.patch  applied"; echo "$*" > "$(dirname "$0")/patches.args"\n')
        # python3, bash, coreutils, df, git: the real ones; nvidia-smi and ray: only if a test adds them
        for tool in ("bash", "env", "mkdir", "tee", "date", "dirname", "df", "awk", "mktemp", "sed", "git",
                     "timeout", "cat", "rm"):
            found = shutil.which(tool)
            if found:
                (self.bin / tool).symlink_to(found)
        # the storage roots exist, as mounted disks do; the run's folders under them do not yet
        (root / "mnt_data").mkdir()
        (root / "mnt_scratch").mkdir()
        self.env = {
            "PATH": str(self.bin),
            # the launcher's python finds the patched copy of openrlhf first, as on a node
            "PYTHONPATH": str(openrlhf_root),
            "HOME": str(root),
            "PYTHON": sys.executable,
            # never the real ray (it would start a cluster on this machine): a fake, or nothing
            "RAY_BIN": str(self.bin / "ray"),
            "APPLY_PATCHES": str(self.patches),
            "DATA_DIR": str(data),
            "DATA_ROOT": str(root / "mnt_data"),
            "SCRATCH_ROOT": str(root / "mnt_scratch"),
            "MIN_FREE_GB_DATA": "0",
            "MIN_FREE_GB_SCRATCH": "0",
            "RFT_MEMINFO": str(self.meminfo(2048)),
        }

    def meminfo(self, available_gib: float) -> Path:
        """A /proc/meminfo stand-in with MemAvailable set (in kB, as the kernel writes it)."""
        path = self.root / f"meminfo_{available_gib}"
        kb = int(available_gib * 1048576)
        path.write_text(f"MemTotal:       {kb + 1048576} kB\nMemFree:        {kb // 2} kB\nMemAvailable:   {kb} kB\n")
        return path

    def run(self, launcher: Path | str, *args: str, **env: str) -> subprocess.CompletedProcess:
        full = {**self.env, **env}
        return subprocess.run(["bash", str(launcher), *args], capture_output=True, text=True,
                              env=full, cwd=self.root, timeout=120)

    def metrics_dir(self, run_name: str) -> Path:
        return self.root / "mnt_scratch" / "rft_metrics" / run_name

    def manifest(self, run_name: str) -> dict:
        return json.loads((self.metrics_dir(run_name) / "run_manifest.json").read_text())

    def fake_nvidia_smi(self, used_mib: list[int]) -> None:
        lines = "".join(f"{i}, {u}\\n" for i, u in enumerate(used_mib))
        _script(self.bin / "nvidia-smi", f'printf "{lines}"\n')

    def fake_ray(self, job_list_rc: int = 0, job_status: str = "succeeded") -> Path:
        """A ray CLI that records its calls and its environment (job list exits job_list_rc; job status says job_status)."""
        log = self.root / "ray_calls.jsonl"
        body = (
            f'"{sys.executable}" -c \'import json, os, sys; '
            f'open("{log}", "a").write(json.dumps({{"argv": sys.argv[1:], '
            f'"env": {{k: os.environ.get(k) for k in ("METRICS_LOG_DIR", "SAMPLES_LOG_DIR", "SPIKE_LOG_PATH")}}}}) + "\\n")\' "$@"\n'
            f'if [[ "$1 $2" == "job list" ]]; then exit {job_list_rc}; fi\n'
            f'if [[ "$1 $2" == "job status" ]]; then echo "Job \'${{!#}}\' {job_status}"; fi\n'
        )
        _script(self.bin / "ray", body)
        return log


@pytest.fixture
def bed(tmp_path, patched_root) -> Bed:
    return Bed(tmp_path, patched_root)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def train_argv(command: list[str]) -> list[str]:
    """The arguments after ``python -m openrlhf.cli.train_ppo_ray``."""
    i = command.index(MODULE)
    assert command[i - 1] == "-m"
    return command[i + 1:]


def printed_command(stdout: str) -> list[str]:
    """The command as printed one flag a line, read back as the shell would."""
    block = stdout.split("\ncommand:\n", 1)[1].split("\ndry run:", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


def dry_run(bed: Bed, size: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = bed.run(LAUNCHERS[size], "--dry-run", *args, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = bed.manifest(env.get("RUN_NAME", f"gpt-oss-{size}-grpo"))
    command = manifest["command"]
    assert printed_command(proc.stdout) == command
    return proc, train_argv(command)


# ---- the command against the real parser -------------------------------------------------
@pytest.mark.parametrize("size", ["20b", "120b"])
def test_dry_run_command_parses_to_the_intended_values(bed, patched_root, size):
    _, argv = dry_run(bed, size)
    args = parse_train_args(patched_root, argv)
    want = {**SHARED, **INTENDED[size],
            "prompt_data": str(bed.pool), "eval_dataset": str(bed.eval),
            "save_path": f"{bed.root}/mnt_data/rft_output/gpt-oss-{size}-grpo",
            "ckpt_path": f"{bed.root}/mnt_data/rft_checkpoints/gpt-oss-{size}-grpo"}
    got = {k: getattr(args, k) for k in want}
    assert got == want


def test_every_flag_is_known_to_the_real_parser(bed, patched_root):
    """Nothing the launchers emit is silently an abbreviation or a typo of another flag."""
    parser = build_train_parser(patched_root)
    known = set(parser._option_string_actions)
    for size in LAUNCHERS:
        _, argv = dry_run(bed, size)
        flags = {a for a in argv if a.startswith("--")}
        assert flags <= known, flags - known


def test_120b_command_needs_the_offload_patch(bed, pristine_root, patched_root):
    _, argv = dry_run(bed, "120b")
    with pytest.raises(SystemExit):
        parse_train_args(pristine_root, argv)  # pristine 0.9.3 has no --offload
    assert parse_train_args(patched_root, argv).offload is True


def test_dr_grpo_stays_critic_free_and_reward_is_the_file(bed, patched_root):
    _, argv = dry_run(bed, "20b")
    args = parse_train_args(patched_root, argv)
    assert args.critic_pretrain is None and args.remote_rm_url == [REWARD]
    assert args.attn_implementation == "eager"  # not switched to FlashAttention-2 by validation


# ---- overrides ---------------------------------------------------------------------------
def test_environment_overrides(bed, patched_root):
    _, argv = dry_run(bed, "20b", LR="1e-6", LORA_RANK="16", LORA_ALPHA="32", EPS_CLIP="0.2",
                      VLLM_GPU_MEM_UTIL="0.8", RUN_NAME="envrun")
    args = parse_train_args(patched_root, argv)
    assert (args.actor_learning_rate, args.lora_rank, args.lora_alpha) == (1e-6, 16, 32)
    assert args.eps_clip_low_high == (0.2, 0.2) and args.vllm_gpu_memory_utilization == 0.8
    assert args.save_path.endswith("/rft_output/envrun")


def test_arguments_win_over_defaults_and_environment(bed, patched_root):
    # 50 episodes are 10,000 updates: the 0.01 warmup would be 100 and LR(20) 19%, so shorten it too
    proc, argv = dry_run(bed, "20b", "--num_episodes", "50", "--actor_learning_rate=1e-6",
                         "--eps_clip", "0.2", "--lr_warmup_ratio", "0.004", LR="3e-7")
    args = parse_train_args(patched_root, argv)
    assert (args.num_episodes, args.actor_learning_rate, args.eps_clip) == (50, 1e-6, 0.2)
    assert args.lr_warmup_ratio == 0.004
    # the checks saw the same values: the pre-flight ran with them
    pre = bed.manifest("gpt-oss-20b-grpo")["preflight"]
    assert pre["inputs"]["num_episodes"] == 50 and pre["inputs"]["actor_learning_rate"] == 1e-6
    assert pre["total_steps"] == 400 * 8 // 16 * 50
    assert "x 50 episodes" in proc.stdout


def test_more_episodes_without_a_shorter_warmup_is_refused(bed):
    """The same override without the warmup: the pre-flight sees 50 episodes and refuses."""
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--num_episodes", "50", "--actor_learning_rate", "1e-6")
    assert proc.returncode == 2
    assert "ABORT: LR at step 20 is 1.9e-07 = 19.0% of the target 1e-06" in proc.stdout
    assert last_line(proc).startswith("train_grpo_20b: pre-flight: ")


def test_argument_paths_are_checked_and_made_absolute(bed, patched_root):
    other = _jsonl(bed.root / "elsewhere" / "pool.jsonl", 300)
    _, argv = dry_run(bed, "20b", "--prompt_data", "elsewhere/pool.jsonl")
    assert parse_train_args(patched_root, argv).prompt_data == str(other)
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--prompt_data", "nowhere.jsonl")
    assert proc.returncode == 2 and "data:" in last_line(proc) and "nowhere.jsonl: not found" in last_line(proc)


def test_reward_module_and_local_model_by_argument(bed, patched_root):
    reward = _script(bed.root / "my_reward.py", "")
    model = bed.root / "models" / "gpt-oss-20b-local"
    model.mkdir(parents=True)
    _, argv = dry_run(bed, "20b", "--remote_rm_url", "my_reward.py", "--pretrain", "models/gpt-oss-20b-local")
    args = parse_train_args(patched_root, argv)
    assert args.remote_rm_url == [str(reward)] and args.pretrain == str(model)
    _, argv = dry_run(bed, "20b", "--pretrain", "openai/gpt-oss-20b")  # a hub id stays as it is
    assert parse_train_args(patched_root, argv).pretrain == "openai/gpt-oss-20b"
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--remote_rm_url", "missing.py")
    assert proc.returncode == 2 and last_line(proc).startswith(f"train_grpo_20b: reward: {bed.root}/missing.py not found")


def test_an_abbreviated_flag_is_refused_with_its_full_name(bed):
    """argparse would take --num_episode for --num_episodes; the command and manifest must say it in full."""
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--num_episode", "50")
    assert proc.returncode == 2
    assert last_line(proc) == ("train_grpo_20b: argument --num_episode: write it in full (--num_episodes); "
                               "the launcher records flags as written")
    assert proc.stderr.count("\n") == 1


def test_every_setting_flag_is_a_real_option(patched_root):
    """Each launcher setting that rft/launch_tools.py bounds names a flag of the real parser."""
    from rft.launch_tools import SETTINGS

    dests = {a.dest for a in build_train_parser(patched_root)._actions}
    flags = {rule.flag for rule in SETTINGS.values() if rule.flag}
    assert len(flags) >= 25 and flags <= dests, flags - dests


def test_lr_scheduler_other_than_cosine_with_min_lr_is_refused(bed):
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--lr_scheduler", "linear")
    assert proc.returncode == 2 and "only cosine_with_min_lr accepts" in last_line(proc)


def test_ema_is_refused_since_rft_trains_lora_only(bed):
    """0.9.3's moving_average zips the policy's and the EMA model's parameters: LoRA breaks it."""
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--enable_ema")
    assert proc.returncode == 2
    assert last_line(proc).startswith("train_grpo_20b: --enable_ema: OpenRLHF 0.9.3's EMA update")
    assert "(--lora_rank 32); drop --enable_ema" in last_line(proc)
    # and a full fine-tune, where EMA would work, is no rft run: the sync and the saves are adapter-only
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", "--enable_ema", "--lora_rank", "0")
    assert proc.returncode == 2 and last_line(proc).startswith("train_grpo_20b: --lora_rank 0 (setting LORA_RANK)")


def test_manifest_records_the_values_openrlhf_parses(bed, patched_root):
    """Flags the launcher never reads are in the manifest as the run will use them (issue: EPS_CLIP=0.1 there)."""
    _, argv = dry_run(bed, "20b", "--eps_clip", "0.2", "--lora_alpha", "16")
    recorded = bed.manifest("gpt-oss-20b-grpo")["openrlhf_args"]
    assert (recorded["eps_clip"], recorded["lora_alpha"], recorded["eps_clip_low_high"]) == (0.2, 16, [0.2, 0.2])
    parsed = vars(parse_train_args(patched_root, argv))
    assert set(recorded) == set(parsed)
    assert recorded["actor_learning_rate"] == 5e-7 and recorded["offload"] is False
    assert "LORA_ALPHA" not in bed.manifest("gpt-oss-20b-grpo")["settings"]  # no second truth


def test_the_refusals_examples_are_the_20b_launchers_defaults(bed):
    """A refusal's "for example LR=5e-7" is the value the 20b launcher would use unset."""
    from rft.launch_tools import EXAMPLES, SETTINGS

    dry_run(bed, "20b")
    args = bed.manifest("gpt-oss-20b-grpo")["openrlhf_args"]
    for name, rule in SETTINGS.items():
        if rule.flag:
            assert args[rule.flag] == rule.kind(EXAMPLES[name]), name


def test_manifest_names_the_run_log_paths_by_their_contract_names(bed):
    from rft.contract import ENV_METRICS_DIR, ENV_SAMPLES_DIR, ENV_SPIKE_PATH

    dry_run(bed, "20b", SPIKE_LOG_PATH=str(bed.root / "mnt_scratch" / "spikes" / "s.jsonl"))
    logs = bed.manifest("gpt-oss-20b-grpo")["run_logs"]
    metrics = bed.metrics_dir("gpt-oss-20b-grpo")
    assert logs == {ENV_METRICS_DIR: str(metrics), ENV_SAMPLES_DIR: str(bed.root / "mnt_scratch/rft_samples/gpt-oss-20b-grpo"),
                    ENV_SPIKE_PATH: str(bed.root / "mnt_scratch/spikes/s.jsonl"), "LOG_FILE": str(metrics / "train.log")}


def test_user_secret_is_not_printed_or_recorded(bed, patched_root):
    proc, argv = dry_run(bed, "20b", "--use_wandb", "sekret-key")
    assert "sekret-key" not in proc.stdout + proc.stderr
    assert "sekret-key" not in (bed.metrics_dir("gpt-oss-20b-grpo") / "run_manifest.json").read_text()
    assert "sekret-key" not in (bed.metrics_dir("gpt-oss-20b-grpo") / "train.log").read_text()


# ---- the checks, in order, each one line -------------------------------------------------
def test_refuses_without_patch_tool_on_a_bare_machine(bed):
    """No patches, no data, no GPU: the first check (patches) refuses, with one line."""
    bed.env.pop("APPLY_PATCHES")
    bed.env.pop("PYTHONPATH")  # the environment's own openrlhf: pristine, so --status fails
    bed.env["DATA_DIR"] = str(bed.root / "no_data")
    proc = bed.run(LAUNCHERS["20b"], "--dry-run")
    assert proc.returncode == 3
    assert last_line(proc).startswith("train_grpo_20b: patches: ")
    assert "check: data" not in proc.stdout


def test_refuses_a_python_without_openrlhf(bed, tmp_path):
    bare = _script(tmp_path / "python-without-openrlhf", 'exec /usr/bin/env -i /bin/false "$@"\n')
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", PYTHON=str(bare))
    assert proc.returncode == 3
    assert last_line(proc) == (f"train_grpo_20b: python: {bare} cannot import openrlhf; "
                               "activate the training environment or set PYTHON")


def test_refuses_when_a_patch_is_not_applied(bed):
    _script(bed.patches, 'echo "offload_cli.patch  not applied"; exit 1\n')
    proc = bed.run(LAUNCHERS["120b"], "--dry-run")
    assert proc.returncode == 3
    assert proc.stderr == ("train_grpo_120b: patches: not every patch of patches/series is applied "
                           "to the installed OpenRLHF; run: bash apply_patches.sh\n")
    assert "offload_cli.patch  not applied" in proc.stdout
    assert os.listdir(bed.root / "mnt_scratch") == []


def test_refuses_when_rft_resolves_to_another_checkout(bed):
    """apply_patches.sh --status exits 6 when the training Python's ``import rft`` is not this checkout."""
    _script(bed.patches, 'echo "rft: /elsewhere/rft (not this checkout)"; exit 6\n')
    proc = bed.run(LAUNCHERS["20b"], "--dry-run")
    assert proc.returncode == 3
    assert proc.stderr == (f"train_grpo_20b: rft: import rft in {sys.executable} does not resolve to {REPO}, so the "
                           f"patched OpenRLHF would run another copy's hooks; run: {sys.executable} -m pip install -e "
                           f"{REPO} (or bash setup_node.sh)\n")


def test_patch_status_is_asked_with_status(bed):
    dry_run(bed, "20b")
    assert (bed.root / "patches.args").read_text().strip() == "--status"
    assert bed.manifest("gpt-oss-20b-grpo")["patches"] == {"exit_status": 0, "status": ["offload_cli.patch  applied"]}


@pytest.mark.parametrize("case, expect", [
    ("missing", "sft_rl_pool.jsonl: not found; regenerate it with: python prepare_sft_data.py"),
    ("empty", "sft_rl_pool.jsonl: empty; regenerate it with: python prepare_sft_data.py"),
    ("keys", "sft_rl_pool.jsonl: line 1 has no label (found input)"),
    ("eval", "probe_set_200_ood.jsonl: not found"),
])
def test_refuses_bad_data(bed, case, expect):
    if case == "missing":
        bed.pool.unlink()
    elif case == "empty":
        bed.pool.write_text("\n")
    elif case == "keys":
        _jsonl(bed.pool, 10, keys=("input",))
    else:
        bed.eval.unlink()
    proc = bed.run(LAUNCHERS["20b"], "--dry-run")
    assert proc.returncode == 2
    assert last_line(proc).startswith("train_grpo_20b: data: ") and expect in last_line(proc)


def test_refuses_a_missing_reward_module(bed):
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", REWARD_FUNC="nowhere/reward.py")
    assert proc.returncode == 2
    assert last_line(proc) == (f"train_grpo_20b: reward: {bed.root}/nowhere/reward.py not found; "
                               "set REWARD_FUNC to the reward module (it must define reward_func)")


def test_refuses_an_eval_set_that_max_samples_would_cut(bed, patched_root, vllm_stub):
    """OpenRLHF caps the eval set with --max_samples too: shown on its real prepare_datasets."""
    import argparse

    trainer = oprl.load(patched_root, "openrlhf.trainer.ppo_trainer")
    strategy = type("S", (), {"print": lambda *a, **k: None, "is_rank_0": lambda self: True,
                              "setup_dataloader": lambda self, ds, *a, **k: ds})()
    strategy.args = argparse.Namespace(
        prompt_data=str(bed.pool), prompt_data_probs=None, seed=42, max_samples=80, prompt_split="train",
        input_template=None, input_key="input", label_key="label", apply_chat_template=False,
        eval_dataset=str(bed.eval), eval_split="train", n_samples_per_prompt=8, train_batch_size=8,
        num_episodes=1, max_epochs=1)
    _, eval_set, _ = trainer.prepare_datasets(strategy, tokenizer=None)
    assert len(eval_set) == 80  # of 202 rows

    proc = bed.run(LAUNCHERS["120b"], "--dry-run", "--max_samples", "80")
    assert proc.returncode == 2
    assert last_line(proc).startswith(f"train_grpo_120b: data: {bed.eval} has 202 rows but --max_samples 80 "
                                      "also cuts the eval set")


def test_refuses_a_schedule_the_preflight_rejects(bed):
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", WARMUP_RATIO="0.05")
    assert proc.returncode == 2
    assert "ABORT: LR at step 20 is" in proc.stdout
    assert last_line(proc).startswith("train_grpo_20b: pre-flight: ")
    assert "check: disk" not in proc.stdout


def test_refuses_short_disk(bed):
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", MIN_FREE_GB_DATA=str(10**9))
    assert proc.returncode == 3
    assert re.fullmatch(r"train_grpo_20b: disk: \d+ GiB free for .*/mnt_data/rft_checkpoints/gpt-oss-20b-grpo, "
                        r"need 1000000000 GiB; free space or point DATA_ROOT / SCRATCH_ROOT elsewhere", last_line(proc))


def test_refuses_unwritable_checkpoint_disk(bed):
    # /proc refuses new files even to root; the nearest existing ancestor is what is probed
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", DATA_ROOT="/proc")
    assert proc.returncode == 3
    assert last_line(proc) == ("train_grpo_20b: disk: cannot write under /proc (for /proc/"
                               "rft_checkpoints/gpt-oss-20b-grpo); set DATA_ROOT / SCRATCH_ROOT to writable disks")


def test_refuses_unwritable_metrics_disk(bed):
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", SCRATCH_ROOT="/proc")
    assert proc.returncode == 3
    assert last_line(proc) == ("train_grpo_20b: disk: cannot write under /proc (for /proc/rft_metrics/"
                               "gpt-oss-20b-grpo); set DATA_ROOT / SCRATCH_ROOT to writable disks")


@pytest.mark.parametrize("root", ["DATA_ROOT", "SCRATCH_ROOT"])
def test_refuses_a_missing_mount_and_creates_nothing(bed, root):
    """The free-space probe would walk up to / and measure the root disk; the mount point is refused."""
    missing = bed.root / "mnt" / "not-mounted"
    proc = bed.run(LAUNCHERS["20b"], "--dry-run", **{root: str(missing)})
    assert proc.returncode == 2
    assert proc.stderr == (f"train_grpo_20b: {root}={missing} does not exist (is the disk mounted?); mount it, "
                           f"or set {root} to an existing directory\n")
    assert not (bed.root / "mnt").exists()


# The sizes: each loading process holds the whole bf16 model (docs/gpu_lane.md); the 20b loads a
# reference model beside the actor (INIT_KL_COEF 0.001), the 120b does not.
@pytest.mark.parametrize("size, loads, per_load", [("20b", 8, 41), ("120b", 4, 220)])
def test_launch_refuses_short_host_memory(bed, size, loads, per_load):
    need = loads * per_load
    bed.fake_nvidia_smi([0] * 8)
    bed.fake_ray()
    proc = bed.run(LAUNCHERS[size], RFT_MEMINFO=str(bed.meminfo(need - 0.5)))
    assert proc.returncode == 3
    assert last_line(proc) == (
        f"train_grpo_{size}: host memory: {need - 1} GiB available, {loads} processes loading at once "
        f"need about {need} GiB ({per_load} each); free memory, set INIT_KL_COEF=0 (no reference "
        "model), or lower HOST_GIB_PER_LOAD if the model is smaller")
    assert not (bed.root / "ray_calls.jsonl").exists()  # refused before Ray was touched
    ok = bed.run(LAUNCHERS[size], RFT_MEMINFO=str(bed.meminfo(need)), RAY_STOP_ON_EXIT="0")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"check: host memory: {need} GiB available, {loads} processes" in ok.stdout


def test_host_memory_counts_the_reference_model_as_the_run_will(bed):
    """--init_kl_coef 0 on the command line drops the reference model, so half the loads."""
    bed.fake_nvidia_smi([0] * 8)
    bed.fake_ray()
    proc = bed.run(LAUNCHERS["20b"], "--init_kl_coef", "0", RFT_MEMINFO=str(bed.meminfo(200)),
                   RAY_STOP_ON_EXIT="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: host memory: 200 GiB available, 4 processes loading at once need about 164 GiB" in proc.stdout


def test_dry_run_warns_of_short_host_memory_and_goes_on(bed):
    proc, argv = dry_run(bed, "20b", RFT_MEMINFO=str(bed.meminfo(24)))
    assert ("warning: host memory: 24 GiB available, 8 processes loading at once need about 328 GiB "
            "(41 each); a launch here would be refused") in proc.stdout
    assert bed.manifest("gpt-oss-20b-grpo")["settings"]["HOST_GIB_PER_LOAD"] == "41"


def test_host_memory_check_can_be_turned_off_or_missing(bed):
    proc, _ = dry_run(bed, "20b", HOST_GIB_PER_LOAD="0", RFT_MEMINFO=str(bed.meminfo(1)))
    assert "check: host memory: not checked (HOST_GIB_PER_LOAD=0)" in proc.stdout
    proc, _ = dry_run(bed, "120b", RFT_MEMINFO=str(bed.root / "no-meminfo"))
    assert "not checked (the load needs about 880 GiB)" in proc.stdout


def test_launch_refuses_without_gpus_after_the_other_checks(bed):
    proc = bed.run(LAUNCHERS["20b"])
    assert proc.returncode == 3
    assert last_line(proc) == "train_grpo_20b: GPUs: nvidia-smi not found; this machine has no NVIDIA driver (8 GPUs needed)"
    assert "check: disk" in proc.stdout


def test_launch_refuses_too_few_gpus(bed):
    bed.fake_nvidia_smi([0, 0, 0, 0])
    proc = bed.run(LAUNCHERS["20b"])
    assert last_line(proc) == "train_grpo_20b: GPUs: 4 visible, the layout needs 8 (actor 1 x 4 + vLLM 2 x 2)"


def test_launch_refuses_busy_gpus(bed):
    bed.fake_nvidia_smi([0, 0, 0, 40000, 0, 0, 0, 0])
    proc = bed.run(LAUNCHERS["20b"])
    assert "GPUs: GPU 3 already has 40000 MiB in use" in last_line(proc)


def test_launch_refuses_unreachable_ray(bed):
    bed.fake_nvidia_smi([0] * 8)
    bed.fake_ray(job_list_rc=1)
    proc = bed.run(LAUNCHERS["20b"], RAY_ADDRESS="http://10.0.0.9:8265")
    assert last_line(proc) == ("train_grpo_20b: Ray: no job server at http://10.0.0.9:8265; RAY_ADDRESS must "
                               "be the dashboard address (http://head:8265)")


def test_launch_submits_the_manifest_command_with_metrics_env(bed):
    """With every check passing (fake GPUs and ray), the job goes to Ray with the metrics env."""
    bed.fake_nvidia_smi([0] * 8)
    log = bed.fake_ray()
    proc = bed.run(LAUNCHERS["20b"], RAY_STOP_ON_EXIT="0", SPIKE_GRAD_NORM="80", SAMPLES_LOG_COUNT="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(l) for l in log.read_text().splitlines()]
    start, listing, submit = calls[0], calls[1], calls[2]
    # submitted without waiting, then the log followed and the final status read
    assert submit["argv"][:3] == ["job", "submit", "--no-wait"]
    assert [c["argv"][:2] for c in calls[3:]] == [["job", "logs"], ["job", "status"]]
    metrics = str(bed.metrics_dir("gpt-oss-20b-grpo"))
    # local head started with the metrics variables in its environment: every worker inherits them
    assert start["argv"][:4] == ["start", "--head", "--num-gpus", "8"]
    assert start["env"]["METRICS_LOG_DIR"] == metrics
    assert listing["argv"][:2] == ["job", "list"]
    manifest = bed.manifest("gpt-oss-20b-grpo")
    argv = submit["argv"]
    sep = argv.index("--")
    assert argv[sep + 1:] == manifest["command"]
    runtime = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime["env_vars"]["METRICS_LOG_DIR"] == metrics
    assert runtime["env_vars"]["SPIKE_LOG_PATH"] == metrics + "/spike_log.jsonl"
    assert runtime["env_vars"]["SAMPLES_LOG_DIR"].endswith("/rft_samples/gpt-oss-20b-grpo")
    # optional knobs of the metrics patch travel when set, and only then
    assert runtime["env_vars"]["SPIKE_GRAD_NORM"] == "80" and "SAMPLES_LOG_COUNT" not in runtime["env_vars"]
    assert manifest["dry_run"] is False
    assert manifest["submit"][1:3] == ["job", "submit"] and manifest["submit"][-1] == "--"


def test_launch_fails_when_the_job_fails(bed):
    """The launcher follows the job's log, then exits non-zero with one line unless the job succeeded."""
    bed.fake_nvidia_smi([0] * 8)
    bed.fake_ray(job_status="failed")
    proc = bed.run(LAUNCHERS["20b"], RAY_STOP_ON_EXIT="0")
    assert proc.returncode == 1
    assert last_line(proc).startswith("train_grpo_20b: job gpt-oss-20b-grpo-")
    assert ": FAILED; see " in last_line(proc)


def test_runtime_env_merges_with_openrlhf_driver_env(bed, patched_root):
    """Ray refuses a job whose env repeats a key of the driver's ray.init runtime_env."""
    from ray._private.worker import _merge_runtime_env

    bed.fake_nvidia_smi([0] * 8)
    log = bed.fake_ray()
    assert bed.run(LAUNCHERS["20b"], RAY_STOP_ON_EXIT="0").returncode == 0
    submit = next(c["argv"] for c in map(json.loads, log.read_text().splitlines()) if c["argv"][:2] == ["job", "submit"])
    job_env = json.loads(submit[submit.index("--runtime-env-json") + 1])
    src = (patched_root / "openrlhf/cli/train_ppo_ray.py").read_text()
    init = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
                and ast.unparse(n.func) == "ray.init")
    driver_env = ast.literal_eval(init.keywords[0].value)
    merged = _merge_runtime_env(job_env, driver_env)
    assert merged is not None
    assert set(merged["env_vars"]) >= {"METRICS_LOG_DIR", "SAMPLES_LOG_DIR", "SPIKE_LOG_PATH", "TOKENIZERS_PARALLELISM"}


# ---- dry run outputs ---------------------------------------------------------------------
def test_dry_run_creates_metrics_dirs_log_and_manifest(bed):
    proc, argv = dry_run(bed, "120b")
    metrics = bed.metrics_dir("gpt-oss-120b-grpo")
    assert metrics.is_dir() and (bed.root / "mnt_scratch/rft_samples/gpt-oss-120b-grpo").is_dir()
    log = (metrics / "train.log").read_text()
    assert "check: pre-flight LR schedule" in log and "--offload" in log
    m = bed.manifest("gpt-oss-120b-grpo")
    assert m["dry_run"] is True and m["run_name"] == "gpt-oss-120b-grpo"
    assert m["env"]["METRICS_LOG_DIR"] == str(metrics)
    assert m["env"]["SPIKE_LOG_PATH"] == str(metrics / "spike_log.jsonl")
    assert m["preflight"]["verdict"] == "ok" and m["preflight"]["total_steps"] == 4000
    assert m["packages"]["openrlhf"] == "0.9.3" and "vllm" in m["packages"]
    assert m["settings"]["MODEL_SIZE"] == "120b" and m["openrlhf_args"]["offload"] is True
    assert m["host"] and m["gpus"] == [] and "gpu_error" in m
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert m["git"]["commit"] == head and isinstance(m["git"]["dirty"], bool)
    assert "check: GPUs and Ray skipped (dry run)" in proc.stdout
    assert (metrics / "lr_schedule.png").read_bytes()[:4] == b"\x89PNG"
    assert list(metrics.glob(".run_manifest.json.*")) == []  # no temp file left behind


def test_printed_command_is_one_flag_a_line(bed):
    proc, _ = dry_run(bed, "20b")
    block = proc.stdout.split("\ncommand:\n", 1)[1].split("\ndry run:", 1)[0].splitlines()
    assert block[0].endswith(f"-m {MODULE} \\")
    for line in block[1:]:
        assert line.startswith("  --") and line.count(" --") == 1, line
    assert "  --target_modules q_proj k_proj v_proj o_proj \\" in block


def test_preflight_defaults_are_the_20b_launcher_values(bed):
    """preflight_lr.sh with no settings checks the run train_grpo_20b.sh would start."""
    dry_run(bed, "20b")
    launcher = bed.manifest("gpt-oss-20b-grpo")["preflight"]
    proc = subprocess.run(["bash", str(REPO / "preflight_lr.sh"), "--json"], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "PYTHON": sys.executable, "POOL_FILE": str(bed.pool)})
    assert json.loads(proc.stdout) == launcher


# ---- the A/B experiments -----------------------------------------------------------------
def test_ab_experiments_differ_only_in_eps_clip(bed, patched_root):
    parsed = {}
    for name in ("a28a_eps02", "a28b_eps01"):
        # the scripts find the pool next to the launcher; point them at the bed's copy
        proc = bed.run(REPO / "experiments" / f"{name}.sh", "--dry-run", PROMPT_DATA=str(bed.pool400))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = bed.manifest(name)
        assert m["preflight"]["total_steps"] == 200 and m["preflight"]["warmup_steps"] == 10
        parsed[name] = vars(parse_train_args(patched_root, train_argv(m["command"])))
    a, b = parsed["a28a_eps02"], parsed["a28b_eps01"]
    assert (a["eps_clip"], b["eps_clip"]) == (0.2, 0.1)
    # wandb_run_name's default is the clock at parse time (minutes): the two parses may straddle one
    differ = {k for k in a if a[k] != b[k]} - {"wandb_run_name"}
    assert differ == {"eps_clip", "eps_clip_low_high", "save_path", "ckpt_path"}
    assert a["prompt_data"] == str(bed.pool400) and a["num_episodes"] == 1


def test_experiment_default_pool_is_the_400_prompt_file():
    for name in ("a28a_eps02", "a28b_eps01"):
        text = (REPO / "experiments" / f"{name}.sh").read_text()
        assert "/../data/sft_rl_pool_400.jsonl" in text and "train_grpo_20b.sh" in text


def test_launcher_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    scripts = [REPO / "grpo_common.sh", *LAUNCHERS.values(), REPO / "train_grpo_tiny.sh", REPO / "preflight_lr.sh",
               REPO / "setup_node.sh", REPO / "setup_cpu.sh", *sorted((REPO / "experiments").glob("*.sh"))]
    proc = subprocess.run([shellcheck, "-x", "-S", "style", *map(str, scripts)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_help_lists_the_knobs_and_launches_nothing(bed, option):
    proc = bed.run(LAUNCHERS["120b"], option)
    assert proc.returncode == 0
    assert "gpt-oss-120b" in proc.stdout and "RAY_ADDRESS" in proc.stdout and "MAX_SAMPLES" in proc.stdout
    assert "Exit status: 0 done" in proc.stdout
    assert os.listdir(bed.root / "mnt_scratch") == []


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_setup_node_help_installs_nothing(tmp_path, option):
    """A python3.11 that records its calls: --help must not run it (it would install about 3 GB)."""
    calls = tmp_path / "calls"
    _script(tmp_path / "python3.11", f'echo "$*" >> "{calls}"\n')
    proc = subprocess.run(["bash", str(REPO / "setup_node.sh"), option], capture_output=True, text=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "VENV=/opt/rft-venv bash setup_node.sh" in proc.stdout and "Exit status:" in proc.stdout
    assert not calls.exists()
    bad = subprocess.run(["bash", str(REPO / "setup_node.sh"), "--hlep"], capture_output=True, text=True,
                         env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and bad.stderr == (
        "setup_node.sh: unknown argument --hlep; settings are environment variables (see --help)\n")
    assert not calls.exists()
