"""``eecompile audit OUT_DIR``: measure what an honest-but-curious server recovers.

Registered by :mod:`eecompile.cli` through :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = (
    "Run the attacks an honest-but-curious server can mount on the compiled model in OUT_DIR and "
    "print what each recovers: frequency analysis of encrypted token ids (on real English traffic "
    "and on text the server samples from the model itself), weight matching against the base "
    "model, known plaintext, hidden-state inversion, each with and without knowledge of the base "
    "weights; with --base-model also the re-key mitigations and the linking attack against them. "
    "Attacks see only OUT_DIR/server plus the side knowledge they state; OUT_DIR/client simulates "
    "the clients and scores the attacks."
)


def _int_list(text: str) -> tuple[int, ...]:
    from eecompile.cli import UsageError

    try:
        values = tuple(int(float(v)) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"expected comma-separated token counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"token counts must be positive, got {text!r}")
    return values


def add_parser(sub, formats: tuple[str, ...]) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("audit", help="measure what the server can recover (attacks and mitigations)",
                       description=DESCRIPTION)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by 'eecompile compile'")
    p.add_argument("--base-model", metavar="ORIGINAL.onnx",
                   help="the model that was compiled: enables the base-model regime, its no-base-model "
                        "counterpart (public models 1%%, 10%%, 50%% away) and the re-key mitigations")
    p.add_argument("--corpus", metavar="TEXT",
                   help="English text for traffic and the attacker's disjoint reference: a UTF-8 file, or "
                        "'kjv' / 'fortunes' (Debian packages); default: every installed one")
    p.add_argument("--tokenizer", metavar="TOKENIZER.json",
                   help="the model's plaintext tokenizer (default: tokenizer.json beside --base-model; "
                        "characters for vocabularies of at most 256 ids)")
    p.add_argument("--public-model", action="append", metavar="PUBLIC.onnx", default=[],
                   help="a related public model the server may know instead of the private weights "
                        "(repeatable; replaces the simulated ones)")
    p.add_argument("--traffic", metavar="N,N,...", default="1000,10000,100000",
                   help="traffic sizes (tokens) for frequency analysis (default 1000,10000,100000)")
    p.add_argument("--generated", metavar="N,N,...", default="100000",
                   help="tokens the server samples from the encrypted model itself, for frequency analysis "
                        "without client traffic (0: skip; default 100000)")
    p.add_argument("--no-mitigations", action="store_true", help="skip re-keys, key rotation and decoys")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a first look (N up to 10000, fewer prompts and keys)")
    p.add_argument("--format", choices=formats, default="text",
                   help="text (a table, the default), json (a list of objects with attack, side_knowledge, "
                        "target, recovered, seconds, ...) or md (Markdown)")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    from eecompile.audit.runner import AuditConfig, run_audit
    from eecompile.audit.server import AuditError

    out = Path(args.out_dir)
    if not out.is_dir():
        raise AuditError(f"output directory not found: {out}" if not out.exists() else f"{out} is not a directory")
    if args.base_model is not None and not Path(args.base_model).is_file():
        raise AuditError(f"base model not found: {args.base_model}")
    generated = () if args.generated.strip() == "0" else _int_list(args.generated)
    cfg = AuditConfig(traffic_tokens=_int_list(args.traffic), generated_tokens=generated,
                      mitigations=not args.no_mitigations)
    if args.quick:
        cfg.traffic_tokens = tuple(n for n in cfg.traffic_tokens if n <= 10_000) or (1_000,)
        cfg.generated_tokens = tuple(min(n, 10_000) for n in cfg.generated_tokens)
        cfg.inversion_prompts, cfg.inversion_length = 2, 8
        cfg.rotation_periods, cfg.rotation_keys = (1_000,), 2
        cfg.decoys, cfg.decoy_tokens = ("uniform",), 2_000
        cfg.known_tokens = (10, 100, 1_000)
    public = [(Path(p).name, p) for p in args.public_model]
    for _, p in public:
        if not Path(p).is_file():
            raise AuditError(f"public model not found: {p}")

    def progress(msg: str) -> None:
        if args.format == "text":
            print(f"  ... {msg}", file=sys.stderr, flush=True)

    report = run_audit(out, args.base_model, args.corpus, tokenizer=args.tokenizer, public_models=public or None,
                       config=cfg, progress=progress)
    if args.format == "json":
        text = report.to_json()
    elif args.format == "md":
        text = report.render_markdown()
    else:
        text = report.render_text()
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
