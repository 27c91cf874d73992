"""What each of clipjob's CPU speed-ups buys: the isolated training step of bench/common.py TINY with one
change undone at a time, each variant in a process of its own (the allocator setting is per process).

    .venv/bin/python bench/ablate.py                      # fp32 and bf16, ~4 min on 2 quiet cores
    .venv/bin/python bench/ablate.py --precisions fp32 --steps 3

Variants: `all` (as shipped), `system-malloc` (CLIPJOB_MALLOC=system: glibc's defaults), `full-last-block`
(Transformer.one_token_last_block off), `flash-sdpa` (torch's own SDPA kernel choice in bf16), `sdpa-math`
(SDPA's math backend in bf16 instead of clipjob's matmul attention), `loop-adamw`
(torch's CPU default AdamW instead of the fused kernel), `full-context` (the text tower on all 32 token
positions instead of the batch's trimmed length, model.text.trim_padding). The tokens are the first 128
captions of the emoji shards the training bench reads (as the trainer gets them: padded to the context, then
trimmed unless the variant undoes it). Writes bench/results/ablate.json and prints samples/s and the gain of
each change (all / variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import CLIPJOB_PY, ROOT, TINY, default_precisions, machine_info, run_env, write_result  # noqa: E402

VARIANTS = ("all", "system-malloc", "full-last-block", "flash-sdpa", "sdpa-math", "loop-adamw", "full-context")


def caption_tokens(batch: int) -> "torch.Tensor":
    """The first `batch` captions of the training bench's emoji shards, tokenised to TINY's context."""
    import tarfile

    from bench.common import TMP
    from bench.train_bench import emoji_shards
    from clipjob.model.tokenizer import ClipTokenizer

    captions: list[str] = []
    with tarfile.open(emoji_shards(TMP / "emoji") / "train-000000.tar") as tf:
        for member in tf:
            if member.name.endswith(".txt") and len(captions) < batch:
                captions.append(tf.extractfile(member).read().decode())
    return ClipTokenizer(TINY.context_length)(captions)


def one(variant: str, precision: str, steps: int, warmup: int, threads: int) -> dict:
    """Runs in the child process: build clipjob's side of bench/mfu.py with `variant` undone, time steps."""
    from clipjob.hostmem import tune_malloc

    malloc = tune_malloc()
    import torch

    from bench.mfu import ClipjobSide, synthetic_batch, timed_steps, warm_up

    torch.set_num_threads(threads)
    side = ClipjobSide(TINY, torch.device("cpu"), precision, False)
    if variant == "full-last-block":
        for m in side.model.modules():
            if hasattr(m, "one_token_last_block"):
                m.one_token_last_block = False
    if variant == "loop-adamw":  # same groups and hyper-parameters, torch's CPU default implementation
        groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in side.opt.param_groups]
        side.opt = torch.optim.AdamW(groups, foreach=False)
    if variant == "flash-sdpa":  # torch's own choice (the flash kernel) instead of clipjob's matmul attention
        import clipjob.model.transformer as tr

        tr._HALF = ()
    if variant == "sdpa-math":  # SDPA's math backend (what clipjob used before matmul_attention)
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        import clipjob.model.transformer as tr

        def sdpa_math(q, k, v, mask=None, causal=False):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

        tr.matmul_attention = sdpa_math
    device = torch.device("cpu")
    images, _ = synthetic_batch(TINY, 128, device)
    tokens = caption_tokens(128)
    if variant != "full-context":
        from clipjob.model.tokenizer import trim_padding

        tokens = trim_padding(tokens)
    warm_up(side, images, tokens, warmup, device)
    times = timed_steps({variant: side}, images, tokens, steps, device)[variant]
    med = statistics.median(times)
    return {"variant": variant, "precision": precision, "host_malloc_keep": malloc, "text_tokens": tokens.shape[1],
            "step_s": [round(t, 3) for t in times],
            "step_s_median": round(med, 4), "samples_per_s": round(128 / med, 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default=None, type=lambda s: s.split(","))
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="ablate", help="Result name under bench/results/ ('' = do not write)")
    a = ap.parse_args(argv)
    if getattr(a, "precisions", 0) is None:
        a.precisions = default_precisions()  # bf16 only where it is fast here
    if a.child:
        variant, precision = a.child.split(":")
        print(json.dumps(one(variant, precision, a.steps, a.warmup, a.threads)))
        return {}
    runs: dict[str, dict[str, dict]] = {}
    for precision in a.precisions:
        runs[precision] = {}
        for variant in a.variants:
            if variant == "flash-sdpa" and precision == "fp32":
                continue  # fp32 already uses torch's choice
            env = run_env(a.threads)
            if variant == "system-malloc":
                env["CLIPJOB_MALLOC"] = "system"
            out = subprocess.run([str(CLIPJOB_PY), __file__, "--child", f"{variant}:{precision}", "--steps",
                                  str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)],
                                 cwd=ROOT, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"ablate {variant} {precision} failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[precision][variant] = r
            print(f"  ablate {precision:4s} {variant:16s} {r['samples_per_s']:7.1f} samples/s", flush=True)
        base = runs[precision].get("all", {}).get("samples_per_s")
        for variant, r in runs[precision].items():
            if base and variant != "all":
                r["gain_of_the_change"] = round(base / r["samples_per_s"], 3)
                print(f"  {precision}: undoing {variant}: clipjob is {r['gain_of_the_change']:.2f}x faster with it")
    result = {"what": "isolated clipjob training step (TINY, batch 128) with one speed-up undone at a time",
              "machine": machine_info(), "threads": a.threads, "steps": a.steps, "warmup": a.warmup, "runs": runs}
    if a.out:
        write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
