"""The ``eecompile`` command line: keygen, compile, lint, demo, generate.

Every error a user can cause (a missing or corrupt file, a key of another version, a
non-empty output directory, ...) is printed as one line ``eecompile: error: <message>`` on
stderr with exit status 2. Anything unexpected is one line ``eecompile: internal error: ...``
with exit status 70; set ``EECOMPILE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from eecompile.errors import EECompileError
from eecompile.passes.options import POLICIES

PROG = "eecompile"
EXIT_OK = 0
EXIT_USAGE = 2  # user errors, as argparse uses for bad arguments
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM

FORMATS = ("text", "json", "md")
POLICY_HELP = ("default: no extra work in the served model; rebase: where an op whose constants cannot be folded "
               "(a post-LN gain, a gain or nonlinearity at the start of the residual stream) binds a space to a "
               "permutation, insert one dense d×d re-basing MatMul after it so the space downstream takes a dense "
               "basis; the report names each point, `eecompile bench` measures the cost")


class UsageError(EECompileError):
    """Bad command-line arguments (reported like every other user error)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so every cleanup that SIGINT runs runs too."""


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler API
    raise Terminated()


def _catch_sigterm():
    """Turn SIGTERM into :class:`Terminated` (main thread only); returns the handler to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - no signals here
        return None


def _notice(line: str) -> None:
    """One line on stderr about something eecompile did on the user's behalf (e.g. removed leftovers)."""
    print(f"{PROG}: {_one_line(line)}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other eecompile error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        hint = f" (see '{self.prog} --help')"
        raise UsageError(message + hint)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_os_error(exc: OSError) -> str:
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


# -- commands ----------------------------------------------------------------------------
def _first_nodes(nodes: list[tuple[str, str]], more_hint: str = "", limit: int = 5) -> str:
    """``name (Op), ...`` for the first ``limit`` nodes, then ``and N more``."""
    names = ", ".join(f"{name} ({op})" for name, op in nodes[:limit])
    return names + (f" and {len(nodes) - limit} more{more_hint}" if len(nodes) > limit else "")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from eecompile.errors import KeyFileError
    from eecompile.keys import generate_key, save_key

    path = Path(args.keyfile)
    if path.is_dir():
        raise KeyFileError(f"{path} is a directory; give a file name for the key")
    if (path.exists() or path.is_symlink()) and not args.force:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it (use --force to replace it)")
    key = generate_key()
    save_key(key, path, overwrite=args.force)
    print(f"wrote key {path} (mode 0600)")
    print(f"fingerprint {key.fingerprint()}")
    print("keep this file secret and backed up: without it nothing compiled with it can be decrypted")
    return EXIT_OK


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_inputs_survive(model: Path, keyfile: Path, out: Path) -> None:
    """Refuse an output directory whose artifacts would replace the model or the key file."""
    from eecompile.compiler import ARTIFACTS

    out = out.resolve()
    for label, path in (("model", model), ("key", keyfile)):
        resolved = path.resolve()
        for name in ARTIFACTS:
            if resolved == out / name or _inside(resolved, out / name):
                from eecompile.errors import OutputDirError

                raise OutputDirError(f"the {label} file {path} lies where the compiler writes {out / name}; "
                                     "choose another --out directory")


def _verify_inputs(args: argparse.Namespace) -> tuple[dict | None, list | None]:
    """--verify-shapes and --verify-feeds, checked before anything is compiled."""
    from eecompile.passes.verify import load_feeds, parse_shapes

    shapes = parse_shapes(args.verify_shapes) if getattr(args, "verify_shapes", None) else None
    feeds = [load_feeds(args.verify_feeds)] if getattr(args, "verify_feeds", None) else None
    if args.no_verify and (shapes or feeds):
        raise UsageError("--no-verify cannot be combined with --verify-shapes or --verify-feeds")
    return shapes, feeds


def _cmd_compile(args: argparse.Namespace) -> int:
    from eecompile.compiler import compile_model
    from eecompile.errors import ModelFileError
    from eecompile.keys import load_key
    from eecompile.passes.options import CompileOptions
    from eecompile.report import BASIS_ORDER, exposure_line

    model, keyfile, out = Path(args.model), Path(args.key), Path(args.out)
    if not model.is_file():
        raise ModelFileError(f"model file not found: {model}" if not model.exists() else f"{model} is not a file")
    key = load_key(keyfile, allow_insecure=args.allow_insecure_key)
    _check_inputs_survive(model, keyfile, out)
    tokenizer = getattr(args, "tokenizer", None)
    if not tokenizer:
        from eecompile.genai import source_tokenizer

        found = source_tokenizer(model)  # a model-builder folder ships its tokenizer: the client gets it encrypted
        tokenizer = str(found) if found is not None else None
    if tokenizer:
        from eecompile.runtime.tokenizer import check_tokenizer_fits

        check_tokenizer_fits(tokenizer, model)  # before compiling: a bad tokenizer leaves OUT_DIR untouched
    shapes, feeds = _verify_inputs(args)
    result = compile_model(model, key, out, force=args.force, verify=not args.no_verify, notice=_notice,
                           verify_shapes=shapes, verify_feeds=feeds,
                           options=CompileOptions(requantize=args.requantize, policy=args.policy),
                           progress=False if args.quiet else None)
    if tokenizer:
        from eecompile.runtime.generate import model_context_length
        from eecompile.runtime.tokenizer import add_tokenizer_to_bundle

        add_tokenizer_to_bundle(tokenizer, result.client_dir, max_positions=model_context_length(model))
    report = result.report

    summary = report.get("summary", {})
    counts = ", ".join(f"{summary[b]} {b}" for b in BASIS_ORDER if b in summary) or "none"
    print(f"compiled {model} with key {key.fingerprint()} into {out}/")
    for warning in report.get("warnings", []):
        print(f"  WARNING: {warning}")
    print(f"  spaces: {len(report['spaces'])} ({counts})")
    for side in ("inputs", "outputs"):
        print(f"  {side}:")
        for io in report[side]:
            print(f"    {io['name']}: {io['protection']}")
    unsupported = report.get("unsupported_ops", [])
    if unsupported:
        names = _first_nodes([(u["node"] or "<unnamed>", u["op_type"]) for u in unsupported])
        print(f"  ops without a rule (their spaces stay clear): {names}")
    v = result.verification
    if v.checked and args.requantize:
        print(f"  verification: measured, not exact (--requantize; {v.detail})")
        if "accuracy" in report:
            print(f"  requantized: {report['accuracy']['detail']}")
    elif v.checked:
        print(f"  verification: passed ({v.detail})")
    else:
        print(f"  verification: not run ({v.detail})")
    exposure = report.get("exposure")
    if exposure:
        print(f"  {exposure_line(exposure)}")
        exposed = exposure.get("exposed", [])
        if exposed:
            names = _first_nodes([(e["node"] or e["tensor"], e["op_type"]) for e in exposed], " (report.json lists them)")
            print(f"    exposed: {names}")
    print(f"  server model:  {result.server_model}  (the server folder is all the server needs)")
    if (result.server_model.parent / "genai_config.json").is_file():
        print(f"  genai config:  {result.server_model.parent / 'genai_config.json'}  (onnxruntime-genai's og.Model "
              "loads the server folder as it is; its special token ids are the server's)")
    print(f"  client bundle: {result.client_dir}/  (keep it on the client side)")
    if tokenizer:
        print(f"  tokenizer:     {result.client_dir / 'tokenizer.json'}  (encrypted: its ids are the model's "
              "permuted ids; client side)")
    print(f"  report:        {out / 'report.md'}, {out / 'report.json'}")
    return EXIT_OK


def _cmd_lint(args: argparse.Namespace) -> int:
    from eecompile.compiler import lint_model
    from eecompile.report import render_markdown, render_text

    from eecompile.passes.options import CompileOptions

    report = lint_model(args.model, notice=_notice, options=CompileOptions(policy=args.policy))
    if args.format == "json":
        text = json.dumps(report, indent=2) + "\n"
    elif args.format == "md":
        text = render_markdown(report)
    else:
        text = render_text(report)
    sys.stdout.write(text)
    sys.stdout.flush()
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from eecompile.bench import run_bench

    result = run_bench(args.out_dir, provider=args.provider, batch=args.batch, seq=args.seq, iters=args.iters,
                       warmup=args.warmup, original=args.original, progress=not args.json)
    print(result.to_json() if args.json else result.to_text(), end="\n" if args.json else "")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if getattr(args, "llm", False):
        from eecompile.demo import run_llm_demo

        return run_llm_demo(sys.stdout)
    from eecompile.demo import run_demo

    return run_demo(sys.stdout)


def _parse_ids(text: str) -> list[int]:
    parts = text.replace(",", " ").split()
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--prompt-ids takes integers separated by spaces or commas, got {text!r}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from eecompile.runtime.generate import EncryptedGenerator

    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=f"{PROG}: %(message)s")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_context is not None and args.max_context < 1:
        raise UsageError(f"--max-context must be >= 1, got {args.max_context}")
    if args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = _parse_ids(args.prompt_ids)
        if not prompt:
            raise UsageError("--prompt-ids is empty")
    if args.runtime == "genai":
        return _generate_genai(args, prompt)
    generator = EncryptedGenerator(args.out_dir, args.provider, max_positions=args.max_context)
    result = generator.generate(prompt, args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                add_special_tokens=not args.no_special_tokens)
    if result.finish_reason == "context":
        print(f"{PROG}: stopped after {len(result.plain_ids)} tokens: the model's context of "
              f"{generator.server.max_positions} tokens is full", file=sys.stderr)
    _print_generation(args, result, f" (stopped: {result.finish_reason})")
    return EXIT_OK


def _print_generation(args: argparse.Namespace, result, stopped: str = "") -> None:
    """The continuation on stdout (text, or the plaintext ids), and with --show-wire the ciphertext ids on stderr."""
    if args.show_wire:
        print(f"{PROG}: prompt ids as the server saw them: {' '.join(map(str, result.prompt_wire_ids))}",
              file=sys.stderr)
        print(f"{PROG}: generated ids as the server produced them: {' '.join(map(str, result.wire_ids))}{stopped}",
              file=sys.stderr)
    if args.prompt is not None:
        sys.stdout.write(result.text)
        if sys.stdout.isatty():
            sys.stdout.write("\n")
    else:
        sys.stdout.write(" ".join(map(str, result.plain_ids)) + "\n")
    sys.stdout.flush()


def _generate_genai(args: argparse.Namespace, prompt: str | list[int]) -> int:
    """``generate --runtime genai``: the stock onnxruntime-genai Generator serves the compiled folder."""
    from eecompile.genai import genai_generate

    if args.max_context is not None:
        raise UsageError("--max-context does not apply to --runtime genai (its genai_config.json sets the context)")
    provider = "cpu" if args.provider == "auto" else args.provider
    result = genai_generate(args.out_dir, prompt, args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, provider=provider,
                            add_special_tokens=not args.no_special_tokens)
    _print_generation(args, result)
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    from eecompile import __version__

    parser = _Parser(
        prog=PROG,
        description="Equivariant encryption for ONNX models: fold secret basis changes into the weights, "
                    "so a server runs the model on data it cannot read.",
        epilog="Start with 'eecompile demo'. Errors print one line and exit with status 2.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("keygen", help="generate a secret master key file",
                       description="Generate a fresh 32-byte master key and write it to KEYFILE with mode 0600. "
                                   "Prints the key's fingerprint, which is safe to share.")
    p.add_argument("keyfile", metavar="KEYFILE", help="where to write the key (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing KEYFILE")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("compile", help="encrypt a model with a key",
                       description="Compile MODEL with the key in KEYFILE into OUT_DIR: server/model.onnx "
                                   "(all the server receives), client/ (the client bundle: encrypt/decrypt "
                                   "transforms, never the master key), report.json and report.md. The input "
                                   "files are never modified.")
    p.add_argument("model", metavar="MODEL.onnx", help="the exported ONNX model")
    p.add_argument("--key", required=True, metavar="KEYFILE", help="key file written by 'eecompile keygen'")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (must be empty or new)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT_DIR, replacing its eecompile artifacts")
    p.add_argument("--allow-insecure-key", action="store_true",
                   help="use a key file that the group or others may access (refused otherwise; chmod 600 fixes it)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar on stderr (it shows only when stderr is a terminal anyway)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking encrypt → server → decrypt against the original on random inputs "
                        "(without it, a model that cannot be verified is not compiled)")
    p.add_argument("--verify-shapes", metavar="NAME=SIZE,...",
                   help="sizes of symbolic input dims for verification, by symbol (past_sequence_length=4) or "
                        "role (batch=1, seq=5, past=2); default: derived from the graph")
    p.add_argument("--verify-feeds", metavar="FILE.npz",
                   help="verify on these inputs (one array per input name, as numpy.savez writes them)")
    p.add_argument("--tokenizer", metavar="TOKENIZER.json",
                   help="a Hugging Face tokenizer.json of the model: its encrypted copy (ids permuted like the "
                        "model's, special tokens included) goes into the client bundle")
    p.add_argument("--requantize", action="store_true",
                   help="quantised weights (MatMulNBits) take dense bases: dequantise, fold, quantise again with the "
                        "same bits and block size. Not exact: compile measures the change against the original "
                        "(max logit difference, greedy-token agreement over 64 tokens) and the report records it. "
                        "Without it quantised weights stay exact on their grid (permutations, column scales)")
    p.add_argument("--policy", choices=POLICIES, default="default", help=POLICY_HELP)
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("lint", help="report what a model's spaces can be protected by",
                       description="Analyse MODEL (no key needed) and print, per hidden space, its size, "
                                   "the strongest basis it can take and the node that limited it; how "
                                   "inputs and outputs are protected; ops without a rule; known weaknesses.")
    p.add_argument("model", metavar="MODEL.onnx", help="the exported ONNX model")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (a table for terminals, the default), json (for machines) or md (Markdown)")
    p.add_argument("--policy", choices=POLICIES, default="default", help="report for this compile policy "
                   "(see compile --policy)")
    p.set_defaults(func=_cmd_lint)

    p = sub.add_parser("bench", help="time the encrypted model against the original, side by side",
                       description="Run the original model (recorded in OUT_DIR/report.json, or --original) and "
                                   "the encrypted model in one process on the same provider with IO binding: "
                                   "warm-up, then interleaved repetitions. Prints p50/p90 latency of each, the "
                                   "encrypted/plaintext ratio with its spread, and the client shim's share.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by `eecompile compile`")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider (default: cpu)")
    p.add_argument("--batch", type=int, default=1, help="batch size for symbolic batch dims (default: 1)")
    p.add_argument("--seq", type=int, default=16, help="length for other symbolic dims (default: 16)")
    p.add_argument("--iters", type=int, default=50, help="timed repetitions per model (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up calls per model (default: 5)")
    p.add_argument("--original", metavar="MODEL.onnx", help="the plaintext model (default: from report.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="run keygen, compile and encrypted inference on a built-in model",
                       description="Build a small transformer in-process (no downloads), generate a key, "
                                   "compile, print the lint summary, then run a random prompt through the "
                                   "original and the encrypted model side by side. Takes a few seconds.")
    p.add_argument("--llm", action="store_true",
                   help="instead: encrypted text generation with the small trained language model, shown beside "
                        "the plaintext generation")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("generate", help="generate text on ciphertext with a compiled language model",
                       description="Encrypt the prompt with the client bundle in OUT_DIR/client (its encrypted "
                                   "tokenizer), generate on the server model OUT_DIR/server/model.onnx — which "
                                   "sees and produces only encrypted token ids and keeps its KV cache encrypted — "
                                   "and print exactly the decrypted continuation on stdout (no trailing newline "
                                   "unless stdout is a terminal). Greedy unless --temperature > 0. Logs go to "
                                   "stderr.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by 'eecompile compile'")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text (needs a compile with --tokenizer)")
    prompt.add_argument("--prompt-ids", metavar="IDS",
                        help="the prompt as plaintext token ids ('1 2 3' or '1,2,3'); prints the generated ids")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 (the default) is greedy decoding")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample among the most likely tokens holding mass P")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampler (same seed, same tokens)")
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                   help="ONNX Runtime execution provider: auto (CUDA if available, else CPU; the default), "
                        "cuda (fails if CUDA is not available), cpu")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="the model's context length, when the model does not say (a learned position table is "
                        "read from the model); longer prompts are refused")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="do not let the tokenizer add its special tokens (e.g. <s>) to the prompt")
    p.add_argument("--show-wire", action="store_true",
                   help="print the token ids the server saw and produced (ciphertext) on stderr")
    p.add_argument("--runtime", choices=("ort", "genai"), default="ort",
                   help="ort (the default): eecompile's generation loop on an ONNX Runtime session; genai: the "
                        "stock onnxruntime-genai Generator on OUT_DIR/server (a compiled model-builder folder), "
                        "its KV cache and search on ciphertext ids")
    p.set_defaults(func=_cmd_generate)
    from eecompile.cli_serve import add_parsers as add_serve_parsers

    add_serve_parsers(sub, generate=p)  # serve, export-triton; generate --server

    from eecompile.audit.cli import add_parser as add_audit_parser

    add_audit_parser(sub, FORMATS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 user error, 70 internal error)."""
    debug = os.environ.get("EECOMPILE_DEBUG", "") not in ("", "0")
    previous_sigterm = _catch_sigterm()
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # stdout closed early (e.g. `eecompile lint m.onnx | head`): not an error.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (EECompileError, OSError) as exc:
        if debug:
            traceback.print_exc()
        message = _describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        if debug:
            traceback.print_exc()
            return EXIT_INTERNAL
        print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
              f"(run with EECOMPILE_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
