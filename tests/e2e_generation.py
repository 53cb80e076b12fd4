"""What the real vLLM engine returns at the end of a Harmony response, as the rollouts ask for it.

Run by ``tests/test_e2e_tiny.py`` on the quick start's model, in the run's environment:

    python tests/e2e_generation.py MODEL_DIR OUT.json

It renders one toy problem through the prompt spec at the quick start's effort, starts the
engine at tensor parallel 1, and generates greedily with the sampling settings OpenRLHF 0.9.3's
rollouts use (``skip_special_tokens=False``, no stop list of their own: the stops come from the
model's ``generation_config.json``). It writes the prompt, the returned token ids and text, the
finish reason and the stop reason, and what OpenRLHF hands the reward: the decoded prompt plus
response, special tokens kept.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(model_dir: Path, out_path: Path) -> int:
    import vllm
    from transformers import AutoTokenizer

    from rft import tiny
    from rft.prompt_spec import PromptSpec, render

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = render(tok, tiny.prompt_text(424_242), PromptSpec.for_tokenizer(tok, tiny.REASONING_EFFORT))
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = vllm.LLM(model=str(model_dir), tensor_parallel_size=1, enforce_eager=True, dtype="bfloat16",
                   max_model_len=256, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=96, min_tokens=1, skip_special_tokens=False)
    (request,) = llm.generate([vllm.TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    out = request.outputs[0]
    report = {
        "prompt": prompt,
        "token_ids": list(out.token_ids),
        "text": out.text,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "reward_query": tok.decode(prompt_ids + list(out.token_ids), skip_special_tokens=False),
        "stop_ids": {t: tok.convert_tokens_to_ids(t) for t in tiny.STOP_TOKENS},
    }
    out_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
