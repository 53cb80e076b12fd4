"""Small helpers the training launchers call: data checks, the Ray runtime env, the run manifest.

Standard library only, so they run before anything heavy is imported::

    python -m rft.launch_tools check-data data/sft_rl_pool.jsonl --keys input,label
    python -m rft.launch_tools runtime-env METRICS_LOG_DIR SAMPLES_LOG_DIR
    python -m rft.launch_tools resolve --setting LR=5e-7 [...] -- python3 -m openrlhf.cli.train_ppo_ray ...
    python -m rft.launch_tools manifest --out DIR/run_manifest.json [...] -- python3 -m openrlhf.cli.train_ppo_ray ...

``resolve`` is the launchers' one gate: every setting, the launcher's own options, and the whole
final argument list read by OpenRLHF's own (installed, patched) parser and validation, then
what rft knows cannot work. A refusal is one line and exit status 2 (3: the machine is not
ready), before the launcher has created anything. The manifest records the same parse.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import importlib.util
import io
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from rft.contract import (
    ENV_FAST_GPTOSS,
    ENV_LORA_SYNC,
    LORA_SYNC_MODES,
    ENV_METRICS_DIR,
    ENV_SAMPLES_DIR,
    ENV_SPIKE_PATH,
    MANIFEST_ARGS,
    MANIFEST_PROMPT_SPEC,
    MANIFEST_RUN_LOGS,
)
from rft.eval_io import atomic_write_text
from rft.prompt_spec import DEFAULT_DATE, DEFAULT_EFFORT, EFFORTS, manifest_record

# Packages whose versions decide what a run does (requirements-node.txt pins them).
PINNED_PACKAGES = (
    "openrlhf", "vllm", "torch", "transformers", "deepspeed", "ray", "peft",
    "accelerate", "datasets", "flash-attn", "numpy",
)
# Flags whose value is a secret: never printed, never written to the manifest.
SECRET_FLAGS = ("--use_wandb",)
REDACTED = "<redacted>"


def redact(argv: list[str]) -> list[str]:
    """Copy of ``argv`` with the values of :data:`SECRET_FLAGS` replaced."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        if name in SECRET_FLAGS:
            if eq:
                out.append(f"{name}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out


def check_row(line: bytes, keys: list[str]) -> str | None:
    """What is wrong with one JSONL row (``None`` when it is a JSON object whose ``keys`` hold text).

    OpenRLHF reads every row of the pool, so one bad row anywhere fails the run inside the job;
    a label must be a string or a number (the reward compares it with the extracted answer).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 (byte {exc.start})"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"is not JSON ({exc.msg}; a torn or partly written line?)"
    if not isinstance(row, dict):
        return "is not a JSON object"
    for key in keys:
        if key not in row:
            return f"has no {key} (found {', '.join(sorted(row)) or 'no keys'})"
        value = row[key]
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return f"has {key} = {json.dumps(value)[:40]}, not text"
        if isinstance(value, str) and not value.strip():
            return f"has an empty {key}"
    return None


def check_data(path: str, keys: list[str]) -> int:
    """Count the rows of a JSONL file, checking every row (blank lines are skipped, as the loader does).

    Raises ValueError with a one-line message naming the file, the line and the fix.
    """
    fix = "regenerate it with: python prepare_sft_data.py"
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path}: is a directory, not a JSONL file; {fix}")
    if not p.is_file():
        raise ValueError(f"{path}: not found; {fix}")
    rows = 0
    try:
        with p.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                problem = check_row(line, keys)
                if problem:
                    raise ValueError(f"{path}: line {number} {problem}; {fix}")
                rows += 1
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror}); fix its permissions or {fix}") from None
    if rows == 0:
        raise ValueError(f"{path}: empty; {fix}")
    return rows


def runtime_env(names: list[str], optional: list[str] = ()) -> str:
    """Ray runtime env JSON that carries environment variables to the job and every actor.

    ``names`` must be set; ``optional`` ones are carried only when set and non-empty.
    """
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise ValueError(f"runtime env: variable(s) not set: {', '.join(missing)}")
    env = {n: os.environ[n] for n in names}
    env.update({n: os.environ[n] for n in optional if os.environ.get(n)})
    return json.dumps({"env_vars": env}, sort_keys=True)


def package_versions(names: tuple[str, ...] = PINNED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when a package is absent), read without importing anything."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- exit codes
EXIT_REFUSED = 2
"""A setting, an argument or an input file is wrong: the one line says which and the fix."""
EXIT_NOT_READY = 3
"""The machine is not ready: interpreter, patches, rft install, disk, host memory, GPUs, Ray."""


class Refusal(ValueError):
    """A launch refused before anything was created; ``str()`` is the one line to print."""

    def __init__(self, line: str, code: int = EXIT_REFUSED):
        super().__init__(line)
        self.code = code


# ------------------------------------------------------------------- launcher settings
@dataclass(frozen=True)
class Rule:
    """What one launcher setting may hold, and the OpenRLHF flag it becomes (if any).

    ``low``/``high`` bound the value (``low_open``: strictly above ``low``); ``when`` names a
    namespace attribute that must be truthy for the flag's bound to apply (the eval flags only
    matter with an eval set).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    flag: str | None = None
    when: str | None = None
    choices: tuple[str, ...] = ()
    parse: Callable[[str], object] | None = None  # for a text setting: raises ValueError with the fix


def fast_gptoss_parts(text: str) -> object:
    """RFT_FAST_GPTOSS as rft/fast_gptoss.py reads it (imported late: it needs torch)."""
    from rft.fast_gptoss import parse_setting

    return parse_setting(text)


POSITIVE = dict(low=1)
SETTINGS: dict[str, Rule] = {
    # the model and LoRA: rft trains adapters only (weight sync and saves are adapter-only)
    "LORA_RANK": Rule(int, flag="lora_rank", **POSITIVE),
    "LORA_ALPHA": Rule(int, flag="lora_alpha", **POSITIVE),
    "OFFLOAD": Rule(str, choices=("0", "1")),
    # how the adapter reaches the engines (rft/openrlhf/native_lora.py, docs/weight_sync.md)
    ENV_LORA_SYNC: Rule(str, choices=LORA_SYNC_MODES),
    "HOST_GIB_PER_LOAD": Rule(int, low=0),
    # optimizer; LoRA learning rates live around 1e-7..1e-3, above 1e-2 the run diverges at once
    "LR": Rule(float, low=0, high=1e-2, low_open=True, flag="actor_learning_rate"),
    "WARMUP_RATIO": Rule(float, low=0, high=1, flag="lr_warmup_ratio"),
    "INIT_KL_COEF": Rule(float, low=0, flag="init_kl_coef"),
    "EPS_CLIP": Rule(float, low=0, high=1, low_open=True, flag="eps_clip"),
    "ENTROPY_LOSS_COEF": Rule(float, low=0, flag="entropy_loss_coef"),
    "SEED": Rule(int, low=0, flag="seed"),
    # batches and lengths
    "N_SAMPLES": Rule(int, flag="n_samples_per_prompt", **POSITIVE),
    "ROLLOUT_BATCH_SIZE": Rule(int, flag="rollout_batch_size", **POSITIVE),
    "TRAIN_BATCH_SIZE": Rule(int, flag="train_batch_size", **POSITIVE),
    "MICRO_ROLLOUT_BATCH_SIZE": Rule(int, flag="micro_rollout_batch_size", **POSITIVE),
    "MICRO_TRAIN_BATCH_SIZE": Rule(int, flag="micro_train_batch_size", **POSITIVE),
    "MAX_EPOCHS": Rule(int, flag="max_epochs", **POSITIVE),
    "NUM_EPISODES": Rule(int, flag="num_episodes", **POSITIVE),
    "MAX_SAMPLES": Rule(int, flag="max_samples", **POSITIVE),
    "PROMPT_MAX_LEN": Rule(int, flag="prompt_max_len", **POSITIVE),
    "GENERATE_MAX_LEN": Rule(int, flag="generate_max_len", **POSITIVE),
    "TEMPERATURE": Rule(float, low=0, low_open=True, flag="temperature"),
    # eval and checkpoints (--save_steps 0 divides by zero after the first step)
    "EVAL_STEPS": Rule(int, flag="eval_steps", when="eval_dataset", **POSITIVE),
    "EVAL_TEMPERATURE": Rule(float, low=0, flag="eval_temperature", when="eval_dataset"),
    "EVAL_N_SAMPLES": Rule(int, flag="eval_n_samples_per_prompt", when="eval_dataset", **POSITIVE),
    "SAVE_STEPS": Rule(int, flag="save_steps", **POSITIVE),
    "MAX_CKPT_NUM": Rule(int, flag="max_ckpt_num", **POSITIVE),
    # layout: rft needs the vLLM engines (rollouts and the LoRA sync go through them)
    "ACTOR_NUM_NODES": Rule(int, flag="actor_num_nodes", **POSITIVE),
    "ACTOR_GPUS_PER_NODE": Rule(int, flag="actor_num_gpus_per_node", **POSITIVE),
    "VLLM_NUM_ENGINES": Rule(int, flag="vllm_num_engines", **POSITIVE),
    "VLLM_TP": Rule(int, flag="vllm_tensor_parallel_size", **POSITIVE),
    "VLLM_GPU_MEM_UTIL": Rule(float, low=0, high=1, low_open=True, flag="vllm_gpu_memory_utilization"),
    # the launcher's own checks, in the units their names say
    "MIN_FREE_GB_DATA": Rule(int, low=0),
    "MIN_FREE_GB_SCRATCH": Rule(int, low=0),
    "MAX_GPU_MEM_USED_MIB": Rule(int, low=0),
    "RAY_DASHBOARD_PORT": Rule(int, low=1, high=65535),
    "RAY_STOP_ON_EXIT": Rule(str, choices=("0", "1")),
    # the prompt spec and the actor's layers
    "REASONING_EFFORT": Rule(str, choices=EFFORTS),
    ENV_FAST_GPTOSS: Rule(str, parse=fast_gptoss_parts),
}
"""Every launcher setting that holds a number or a switch; the launchers give each a default."""

_INT = re.compile(r"[+-]?\d+")
_UNIT = re.compile(r"\s*[+-]?[\d.]+(?:e[+-]?\d+)?\s*[a-z%]+\s*", re.I)


EXAMPLES = {
    "LORA_RANK": "32", "LORA_ALPHA": "64", "OFFLOAD": "1", ENV_LORA_SYNC: "native", "HOST_GIB_PER_LOAD": "41", "LR": "5e-7",
    "WARMUP_RATIO": "0.01", "INIT_KL_COEF": "0.001", "EPS_CLIP": "0.1", "ENTROPY_LOSS_COEF": "0", "SEED": "42",
    "N_SAMPLES": "8", "ROLLOUT_BATCH_SIZE": "16", "TRAIN_BATCH_SIZE": "16", "MICRO_ROLLOUT_BATCH_SIZE": "8",
    "MICRO_TRAIN_BATCH_SIZE": "1", "MAX_EPOCHS": "1", "NUM_EPISODES": "20", "MAX_SAMPLES": "400",
    "PROMPT_MAX_LEN": "1024", "GENERATE_MAX_LEN": "4096", "TEMPERATURE": "1.0", "EVAL_STEPS": "5",
    "EVAL_TEMPERATURE": "0.0", "EVAL_N_SAMPLES": "1", "SAVE_STEPS": "10", "MAX_CKPT_NUM": "3",
    "ACTOR_NUM_NODES": "1", "ACTOR_GPUS_PER_NODE": "4", "VLLM_NUM_ENGINES": "2", "VLLM_TP": "2",
    "VLLM_GPU_MEM_UTIL": "0.85", "MIN_FREE_GB_DATA": "50", "MIN_FREE_GB_SCRATCH": "20",
    "MAX_GPU_MEM_USED_MIB": "2048", "RAY_DASHBOARD_PORT": "8265", "RAY_STOP_ON_EXIT": "1",
    "REASONING_EFFORT": "medium", ENV_FAST_GPTOSS: "1",
}
"""A valid value of each setting (the 20b launcher's default), shown in the fix of a refusal."""


def _example(name: str) -> str:
    return f"{name}={EXAMPLES[name]}"


def _bounds(rule: Rule) -> str:
    low = "" if rule.low is None else f"{'above' if rule.low_open else 'at least'} {rule.low:g}"
    high = "" if rule.high is None else f"at most {rule.high:g}"
    return " and ".join(x for x in (low, high) if x)


def read_number(text: str, rule: Rule) -> int | float:
    """``text`` as the rule's number type; ValueError (no message) when it is not one.

    Strict: no units, no ``nan``/``inf``, and an integer setting takes digits only (bash would
    read ``1e3`` or ``4.0`` differently from Python).
    """
    if rule.kind is int:
        if not _INT.fullmatch(text.strip()):
            raise ValueError
        return int(text)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError
    return value


def out_of_bounds(value: float, rule: Rule) -> bool:
    """Whether ``value`` breaks the rule's bounds."""
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        return True
    return rule.high is not None and value > rule.high


def check_setting(name: str, text: str) -> str | None:
    """The one-line refusal for the launcher setting ``name=text``, or None when it is fine.

    Settings that become OpenRLHF flags are only type-checked here (naming the variable the
    user set); their bounds are checked on the parsed arguments (:func:`check_namespace`),
    so that a flag given on the command line meets the same bound.
    """
    rule = SETTINGS[name]
    if rule.parse is not None:
        try:
            rule.parse(text)
        except ValueError as exc:
            return f"{exc}; for example {_example(name)}"
        return None
    if rule.choices:
        if text not in rule.choices:
            return f"{name}={text}: must be {' or '.join(rule.choices)}; for example {_example(name)}"
        return None
    try:
        value = read_number(text, rule)
    except ValueError:
        what = "a whole number" if rule.kind is int else "a number"
        hint = " without a unit (the unit is in the name)" if _UNIT.fullmatch(text) else ""
        return f"{name}={text}: not {what}; write it{hint} as in {_example(name)}"
    if rule.flag is None and out_of_bounds(value, rule):
        return f"{name}={text}: must be {_bounds(rule)}; for example {_example(name)}"
    return None


def check_settings(settings: dict[str, str]) -> str | None:
    """The first refusal among the launcher settings given (names not in SETTINGS are skipped)."""
    for name, text in settings.items():
        if name in SETTINGS:
            line = check_setting(name, text)
            if line:
                return line
    return None


# ------------------------------------------------------ the final command, as OpenRLHF reads it
TRAIN_MODULE = "openrlhf.cli.train_ppo_ray"
TRAIN_FILE = Path("cli", "train_ppo_ray.py")
# Flags whose value is a path: made absolute, because the Ray job runs in another directory.
PATH_FLAGS = ("--prompt_data", "--eval_dataset", "--save_path", "--ckpt_path", "--remote_rm_url")


def train_file() -> Path:
    """``openrlhf/cli/train_ppo_ray.py`` of the interpreter's openrlhf, found without importing it."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise Refusal("python: openrlhf is not importable; activate the training environment or set PYTHON",
                      EXIT_NOT_READY)
    return Path(list(spec.submodule_search_locations)[0]) / TRAIN_FILE


def _main_block(path: Path) -> types.CodeType:
    """The ``if __name__ == "__main__":`` body of train_ppo_ray.py: its parser and validation."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and isinstance(test, ast.Compare) and getattr(test.left, "id", "") == "__name__":
            return compile(ast.Module(body=node.body, type_ignores=[]), str(path), "exec")
    raise Refusal(f"python: {path} has no __main__ block; reinstall openrlhf 0.9.3 and run bash apply_patches.sh",
                  EXIT_NOT_READY)


class _Parsed(Exception):
    """Carries the validated namespace out of the main block, where ``train(args)`` would start."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_train_argv(
    argv: list[str], path: Path, check: Callable[[argparse.Namespace], str | None] | None = None,
) -> tuple[argparse.Namespace, list[str]]:
    """The namespace ``train(args)`` would get from ``argv``, and the warnings the file printed.

    Runs the main block of ``path`` (OpenRLHF's own parser and its own argument validation)
    with ``train`` replaced, so nothing is imported or started. Abbreviations are refused
    (``allow_abbrev=False``): the printed command and the manifest must say the flag in full.
    ``check`` (namespace -> refusal or None) runs on the values as parsed, before the file's
    validation, whose asserts would otherwise speak first and name no flag.
    Raises :class:`Refusal` with the parser's, ``check``'s or the validation's message.
    """

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "allow_abbrev": False})

        def parse_args(self, args=None, namespace=None):
            parsed = super().parse_args(list(argv) if args is None else args, namespace)
            line = check(parsed) if check else None
            if line:
                raise Refusal(line)
            return parsed

        def error(self, message):
            raise Refusal(_parser_message(message, self))

    def train(args: argparse.Namespace) -> None:
        raise _Parsed(args)

    module = types.ModuleType("argparse")
    module.__dict__.update(argparse.__dict__)
    module.ArgumentParser = Parser
    printed = io.StringIO()
    scope = {"__builtins__": __builtins__, "__name__": "__main__", "datetime": _dt.datetime,
             "argparse": module, "train": train}
    try:
        with contextlib.redirect_stdout(printed):
            exec(_main_block(path), scope)
    except _Parsed as done:
        return done.namespace, [l for l in printed.getvalue().splitlines() if l.strip()]
    except Refusal:
        raise
    except AssertionError as exc:
        raise Refusal(f"arguments: OpenRLHF refuses them: {exc}") from None
    except Exception as exc:  # the validation itself breaks on a combination (None > 0)
        raise Refusal(f"arguments: OpenRLHF's argument validation fails on them ({type(exc).__name__}: {exc}); "
                      "drop the flag that was added last") from None
    raise Refusal(f"python: {path}'s main block never reached train(args); reinstall openrlhf and apply the patches",
                  EXIT_NOT_READY)


def _parser_message(message: str, parser: argparse.ArgumentParser) -> str:
    """argparse's error as one line with the fix; an unknown flag that abbreviates a real one says so."""
    if message.startswith("unrecognized arguments: "):
        unknown = message.split(": ", 1)[1].split()
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        name = flag.split("=", 1)[0]
        full = sorted(k for k in parser._option_string_actions if k.startswith(name) and k != name)
        if full:
            return f"argument {name}: write it in full ({', '.join(full[:3])}); the launcher records flags as written"
        return (f"argument {name}: not an option of {TRAIN_MODULE} (patched OpenRLHF 0.9.3); "
                f"check the spelling in python -m {TRAIN_MODULE} --help")
    return f"{message}; fix the flag (python -m {TRAIN_MODULE} --help lists every option)"


def launcher_typo(user_args: list[str]) -> str | None:
    """A refusal for an argument that looks like a launcher option but is not one (``--dryrun``).

    Otherwise it would go to OpenRLHF, and a mistyped dry run would be a real launch.
    """
    for arg in user_args:
        if not arg.startswith("-"):  # a value (--use_wandb dryrun), not an option
            continue
        squashed = re.sub(r"[-_]", "", arg.split("=", 1)[0]).lower()
        for option in ("--dry-run", "--help"):
            if arg != option and squashed == re.sub(r"[-_]", "", option):
                return f"argument {arg}: not a launcher option; write {option}"
    return None


def absolute_paths(argv: list[str], cwd: str, exists=os.path.exists) -> list[str]:
    """``argv`` with the values of PATH_FLAGS (and a ``--pretrain`` that is a local dir) made absolute."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(out):
            value = out[i + 1]
        is_path = name in PATH_FLAGS or name == "--pretrain" and value and exists(os.path.join(cwd, value))
        if not is_path or not value or value.startswith(("/", "-")):
            continue
        if name == "--remote_rm_url" and "://" in value:
            continue
        absolute = os.path.normpath(os.path.join(cwd, value))
        if eq:
            out[i] = f"{name}={absolute}"
        else:
            out[i + 1] = absolute
    return out


def check_bounds(ns: argparse.Namespace) -> str | None:
    """The first flag whose parsed value breaks its setting's bounds (SETTINGS), named with the setting."""
    for name, rule in SETTINGS.items():
        if not rule.flag or (rule.when and not getattr(ns, rule.when, None)):
            continue
        value = getattr(ns, rule.flag)
        if value is None and rule.low == 1:  # a count OpenRLHF leaves unset: no vLLM engines, for one
            return f"--{rule.flag} is not set (setting {name}); rft needs it: give --{rule.flag} {EXAMPLES[name]}"
        if value is None:  # off, as OpenRLHF means it (--entropy_loss_coef)
            continue
        if out_of_bounds(value, rule):
            return (f"--{rule.flag} {value:g} (setting {name}): must be {_bounds(rule)}; "
                    f"for example {_example(name)} or --{rule.flag} {EXAMPLES[name]}")
    return None


def check_namespace(ns: argparse.Namespace) -> str | None:
    """What rft knows cannot work, on the arguments as OpenRLHF validated them; None when fine."""
    if ns.packing_samples:
        return ("--packing_samples: OpenRLHF then switches attention to FlashAttention-2, which drops gpt-oss's "
                "attention sinks (--use_dynamic_batch and --ring_attn_size > 1 turn it on too); drop it")
    if ns.enable_ema:
        return (f"--enable_ema: OpenRLHF 0.9.3's EMA update pairs the policy's parameters with the EMA model's "
                f"by position, which fails with LoRA (--lora_rank {ns.lora_rank}); drop --enable_ema")
    if ns.lr_scheduler != "cosine_with_min_lr":
        return (f"--lr_scheduler {ns.lr_scheduler}: OpenRLHF 0.9.3 passes min_lr to every scheduler, which only "
                "cosine_with_min_lr accepts; drop the flag")
    for url in ns.remote_rm_url or ():
        if "://" not in url and not os.path.isfile(url):
            return f"reward: {url} not found; set REWARD_FUNC to the reward module (it must define reward_func)"
    return None


def missing_root(paths: dict[str, str], roots: dict[str, str], isdir=os.path.isdir) -> str | None:
    """A refusal when a run path lies under a storage root (DATA_ROOT, SCRATCH_ROOT) that does not exist.

    A missing mount point must not be created on the root disk: the free-space probe would
    measure the root file system and the run would fill it.
    """
    for root_name, root in roots.items():
        users = [p for p in paths.values() if os.path.normpath(p).startswith(os.path.normpath(root) + os.sep)]
        if users and not isdir(root):
            return (f"{root_name}={root} does not exist (is the disk mounted?); mount it, or set {root_name} "
                    "to an existing directory")
    return None


SHELL_VALUES = (
    "prompt_data", "eval_dataset", "max_samples", "n_samples_per_prompt", "train_batch_size",
    "rollout_batch_size", "num_episodes", "max_epochs", "lr_warmup_ratio", "actor_learning_rate",
    "init_kl_coef", "save_path", "ckpt_path", "actor_num_nodes", "actor_num_gpus_per_node",
    "vllm_num_engines", "vllm_tensor_parallel_size",
)
"""The parsed values the launcher's later checks (data, pre-flight, disk, memory, GPUs) read."""


def shell_value(value: object) -> str:
    """A parsed value as the launcher's checks read it (None is empty, 1e8 is 100000000)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def resolve(command: list[str], settings: dict[str, str], cwd: str,
            run_paths: dict[str, str], roots: dict[str, str]) -> tuple[list[str], argparse.Namespace, list[str]]:
    """Every check of the launch that needs no file system beyond stat, in order; returns the final command.

    Settings first (named as the user set them), then the launcher's own options, then the whole
    argument list through OpenRLHF's parser and validation, then rft's rules on the result.
    """
    line = check_settings(settings)
    if line:
        raise Refusal(line)
    i = command.index(TRAIN_MODULE) + 1
    line = launcher_typo(command[i:])
    if line:
        raise Refusal(line)
    command = command[:i] + absolute_paths(command[i:], cwd)
    ns, notes = parse_train_argv(command[i:], train_file(), check_bounds)
    line = check_namespace(ns) or missing_root({**run_paths, "--save_path": ns.save_path, "--ckpt_path": ns.ckpt_path},
                                               roots)
    if line:
        raise Refusal(line)
    return command, ns, notes


def shell_assignments(command: list[str], ns: argparse.Namespace) -> str:
    """Bash that sets TRAIN_CMD and the RUN array (parsed values) for ``eval`` in the launcher."""
    values = " ".join(f"[{k}]={shlex.quote(shell_value(getattr(ns, k)))}" for k in SHELL_VALUES)
    return f"TRAIN_CMD=({' '.join(map(shlex.quote, command))})\ndeclare -gA RUN=({values})\n"


def namespace_record(ns: argparse.Namespace) -> dict:
    """The parsed arguments as JSON-ready values, secrets replaced."""
    out = {}
    for key, value in sorted(vars(ns).items()):
        if f"--{key}" in SECRET_FLAGS and value is not None:
            value = REDACTED
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        elif not isinstance(value, (str, int, float, bool, list, type(None))):
            value = str(value)
        out[key] = value
    return out


def _run(cmd: list[str], cwd: str | None = None) -> tuple[int, str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def git_state(repo: str) -> dict:
    """Commit and dirtiness of the repository the launcher lives in."""
    rc, commit = _run(["git", "-C", repo, "rev-parse", "HEAD"])
    if rc != 0:
        return {"commit": None, "dirty": None, "error": commit.splitlines()[-1] if commit else "git failed"}
    # --no-optional-locks: a status never takes index.lock away from a concurrent git command
    rc, status = _run(["git", "--no-optional-locks", "-C", repo, "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(status) if rc == 0 else None, "changed": status.splitlines() if rc == 0 else None}


def gpu_inventory() -> dict:
    """GPUs as nvidia-smi reports them (empty list and the reason when it cannot)."""
    rc, out = _run([
        "nvidia-smi", "--query-gpu=index,name,memory.total,memory.used,uuid,driver_version",
        "--format=csv,noheader,nounits",
    ])
    if rc != 0:
        return {"gpus": [], "gpu_error": out.splitlines()[-1] if out else f"nvidia-smi exited {rc}"}
    gpus = []
    for line in out.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 6:
            gpus.append({
                "index": parts[0], "name": parts[1], "memory_total_mib": parts[2],
                "memory_used_mib": parts[3], "uuid": parts[4], "driver": parts[5],
            })
    return {"gpus": gpus}




def run_logs(env: dict[str, str | None], log_file: str) -> dict[str, str | None]:
    """The run-log paths the trainer's actors get (the runtime env carries these variables)."""
    out = {name: env.get(name) for name in (ENV_METRICS_DIR, ENV_SAMPLES_DIR, ENV_SPIKE_PATH)}
    out["LOG_FILE"] = log_file or None
    return out


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in items)


def build_manifest(args: argparse.Namespace, command: list[str]) -> dict:
    """Everything needed to reproduce the run; the settings are the parsed command's, not the shell's."""
    settings = _pairs(args.setting)
    env = {name: os.environ.get(name) for name in args.env}
    start = command.index(TRAIN_MODULE) + 1
    namespace, _ = parse_train_argv(command[start:], train_file())
    preflight = None
    if args.preflight_json:
        try:
            preflight = json.loads(Path(args.preflight_json).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            preflight = {"error": str(exc)}
    return {
        "schema": 1,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "run_name": args.run_name,
        "command": redact(command),
        "submit": redact(args.submit.split("\x1f")) if args.submit else None,
        "env": env,
        MANIFEST_ARGS: namespace_record(namespace),
        MANIFEST_PROMPT_SPEC: manifest_record(namespace.pretrain, getattr(namespace, "reasoning_effort", DEFAULT_EFFORT),
                                              getattr(namespace, "prompt_date", DEFAULT_DATE)),
        MANIFEST_RUN_LOGS: run_logs(dict(os.environ), args.log_file),
        "settings": settings,
        "preflight": preflight,
        "patches": {"exit_status": args.patch_rc, "status": args.patch_status.splitlines()},
        "git": git_state(args.repo),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        **gpu_inventory(),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rft.launch_tools``."""
    parser = argparse.ArgumentParser(prog="python -m rft.launch_tools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("check-data", help="print the row count of a JSONL file after checking its keys")
    p.add_argument("path")
    p.add_argument("--keys", default="", help="comma-separated keys the first row must have")

    p = sub.add_parser("redact", help="print the arguments one a line, secrets replaced")
    p.add_argument("argv", nargs=argparse.REMAINDER)

    p = sub.add_parser("runtime-env", help="print a Ray runtime env JSON carrying these env variables")
    p.add_argument("names", nargs="+")
    p.add_argument("--optional", nargs="*", default=[], help="variables carried only when set")

    p = sub.add_parser("manifest", help="write run_manifest.json; the command follows --")
    p.add_argument("--out", required=True)
    p.add_argument("--run-name", default="")
    p.add_argument("--repo", default=".")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--submit", default="", help="submission prefix, arguments separated by \\x1f")
    p.add_argument("--patch-rc", type=int, default=None)
    p.add_argument("--patch-status", default="")
    p.add_argument("--preflight-json", default="")
    p.add_argument("--setting", action="append", default=[], help="NAME=VALUE of a launcher setting")
    p.add_argument("--env", action="append", default=[], help="environment variable to record")
    p.add_argument("--log-file", default="", help="the launcher's log")
    p.add_argument("command", nargs=argparse.REMAINDER)

    sub.add_parser("setting-names", help="print the launcher settings resolve checks, one a line")

    p = sub.add_parser("resolve", help="check the settings and the whole command; print bash for eval")
    p.add_argument("--cwd", default=os.getcwd(), help="where relative paths are resolved")
    p.add_argument("--setting", action="append", default=[], help="NAME=VALUE of a launcher setting")
    p.add_argument("--path", action="append", default=[], help="NAME=PATH the run writes")
    p.add_argument("--root", action="append", default=[], help="NAME=DIR a storage root that must exist")
    p.add_argument("command", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.cmd == "setting-names":
        print("\n".join(SETTINGS))
        return 0
    if args.cmd == "resolve":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        try:
            final, ns, notes = resolve(command, _pairs(args.setting), args.cwd, _pairs(args.path), _pairs(args.root))
        except Refusal as refusal:
            print(refusal)  # on stdout: the launcher prints it as its one line
            return refusal.code
        for note in notes:
            print(f"note: OpenRLHF: {note}", file=sys.stderr)
        print(shell_assignments(final, ns), end="")
        return 0
    try:
        if args.cmd == "check-data":
            keys = [k for k in args.keys.split(",") if k]
            print(check_data(args.path, keys))
        elif args.cmd == "redact":
            print("\n".join(redact(args.argv)))
        elif args.cmd == "runtime-env":
            print(runtime_env(args.names, args.optional))
        else:
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                parser.error("manifest: give the command after --")
            atomic_write_text(args.out, json.dumps(build_manifest(args, command), indent=2, sort_keys=True) + "\n")
    except Refusal as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
