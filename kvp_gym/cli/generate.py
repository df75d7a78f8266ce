"""``kvp-gym generate``: answer a prompt with an evicting cache and show the memory it frees.

Imports kvp_gym.cli.options at module level; kvp_gym.models, kvp_gym.cache, kvp_gym.device and kvp_gym.scorers only
when the command runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvp_gym.cli.options import add_device, add_model, budget, positive_int


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``generate``."""
    generate = commands.add_parser(
        "generate",
        help="answer a prompt with an evicting cache and show the memory it frees",
        description="Prefill the prompt, compress every KV head to --budget tokens with --policy (4 sink + 16 recent "
        "tokens always kept), decode greedily; print the answer and the KV cache's bytes before and after.",
    )
    add_model(generate, help="smollm2-135m, tiny-random or a model folder")
    generate.add_argument("--policy", default="kvp", help="a scorer spec: name or name:param=value;... (default kvp)")
    generate.add_argument(
        "--budget", type=budget, required=True, help="tokens kept per KV head (e.g. 128) or a fraction (e.g. 0.25)"
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", type=Path, help="a text file holding the prompt")
    source.add_argument("--prompt", help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument(
        "--decode-every", type=positive_int, help="re-compress to the budget every N generated tokens (bounded memory)"
    )
    generate.add_argument(
        "--prefill-chunk",
        type=positive_int,
        metavar="C",
        help="chunked prefill (a variant): cut the cache back to the budget after every C prompt tokens, so the "
        "whole prompt's cache never exists; h2o, expected_attention and the oracle cannot be chunked",
    )
    add_device(generate)
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from kvp_gym import models
    from kvp_gym.cache import CacheError, generate
    from kvp_gym.cache.evicting import DEFAULT_RECENT, DEFAULT_SINKS
    from kvp_gym.cache.generate import chunked_prefill_refusal
    from kvp_gym.device import resolve_device
    from kvp_gym.scorers import ScorerError, from_spec, model_mismatches

    # Everything that can be checked without the model is checked before it loads (that takes up to a minute).
    scorer = from_spec(args.policy)
    protected = DEFAULT_SINKS + DEFAULT_RECENT
    if isinstance(args.budget, int) and args.budget < protected:
        raise CacheError(
            f"--budget {args.budget} is below the {protected} protected tokens ({DEFAULT_SINKS} sinks + "
            f"{DEFAULT_RECENT} recent, always kept): use a budget of at least {protected}"
        )
    refusal = args.prefill_chunk and chunked_prefill_refusal(scorer, args.prefill_chunk)
    if refusal:
        raise CacheError(f"--prefill-chunk {args.prefill_chunk}: {refusal}")
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    resolve_device(args.device)
    model, tokenizer = models.load(args.model)
    model.to(resolve_device(args.device))
    for reason in model_mismatches({args.policy: scorer}, args.model, models.geometry(model)).values():
        raise ScorerError(reason)
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    out = generate(
        model,
        tokenizer,
        prompt,
        scorer,
        args.budget,
        max_new_tokens=args.max_new_tokens,
        decode_every=args.decode_every,
        prefill_chunk=args.prefill_chunk,
    )
    print(out.text)
    print(
        f"prompt {out.prompt_length} tokens; KV cache {out.kv_bytes_full / 2**20:.2f} MiB after prefill, "
        f"{out.kv_bytes_compressed / 2**20:.2f} MiB after compression "
        f"({out.kv_bytes_compressed / out.kv_bytes_full:.1%}); {out.compressions[0]}"
        + (f"; {len(out.compressions) - 1} decode-time compressions" if len(out.compressions) > 1 else ""),
        file=sys.stderr,
    )
    return 0
