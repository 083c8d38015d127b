"""``python -m eecompile.models.tinylm [--prompt TEXT ...] [--max-new-tokens N] [--model-dir DIR]``:
print greedy plaintext continuations of the shipped (or given) model, one per prompt."""

from __future__ import annotations

import argparse
import sys

from . import greedy_generate_plain, load_metrics

DEFAULT_PROMPTS = ("And God said", "In the beginning", "The LORD is my shepherd")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m eecompile.models.tinylm", description=__doc__)
    ap.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--model-dir", default=None, help="trained model directory (default: the shipped one)")
    args = ap.parse_args(argv)
    m = load_metrics(args.model_dir)
    print(f"# held-out perplexity {m['heldout_perplexity']:.2f} ({m['corpus']}, {m['parameters']} parameters)",
          file=sys.stderr)
    for prompt in args.prompt or DEFAULT_PROMPTS:
        cont = greedy_generate_plain(prompt, args.max_new_tokens, args.model_dir)
        print(f"{prompt}{cont}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
