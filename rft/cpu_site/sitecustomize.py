"""Installs rft's CPU stand-ins at the start of every Python process of a CPU run.

``train_grpo_tiny.sh`` puts this folder (and the repository) on ``PYTHONPATH`` with
``RFT_CPU_STAND_INS=1``; Python imports ``sitecustomize`` at start-up. What stands in for what:
``rft/cpu_stand_ins.py``.
"""

import os

if os.environ.get("RFT_CPU_STAND_INS") == "1":
    from rft import cpu_stand_ins

    cpu_stand_ins.install()
