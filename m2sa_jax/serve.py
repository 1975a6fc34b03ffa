"""Command line: the web page and the HTTP API for a LISA/M²SA model, in one process.

    python -m m2sa_jax.serve                          # the README demo's run, outputs/synthetic
    python -m m2sa_jax.serve --checkpoint converted/m2sa_7b --port 8000 --api-key "$KEY"

The page is at http://127.0.0.1:7860/, the API under /api (OpenAPI docs at /docs). The server
binds 127.0.0.1 unless --host says otherwise. With --api-key (or M2SA_API_KEY) every /api call
needs "Authorization: Bearer <key>" and the page asks for the key as its password.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_CHECKPOINT = "outputs/synthetic"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m2sa_jax.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="the model, as m2sa_jax.load takes it (default: %(default)s, the model "
                        "`bash scripts/demo.sh` trains)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=os.environ.get("M2SA_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /api/* (default: $M2SA_API_KEY)")
    p.add_argument("--examples", default=None,
                   help="MMR-format folder (MMR_val.json + images/) for the page's examples "
                        "(default: the data root in the checkpoint's config.json, if any)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=8,
                   help="questions per model call; 1 turns batching off (default %(default)s)")
    g.add_argument("--row-buckets", default=None,
                   help="batch sizes to compile, comma-separated (default: 1 and --max-batch); "
                        "a batch runs at the smallest that holds it")
    g.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long a request waits for others to join its batch")
    g.add_argument("--max-queue", type=int, default=64,
                   help="questions waiting at most; more get 503 with Retry-After")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per request, queueing included; beyond: 504")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens")
    g.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="longest prompt (template + question) in tokens; one compiled bucket "
                        "per 64")
    g.add_argument("--max-image-mp", type=float, default=20.0, help="largest image, megapixels")
    g.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body, MiB")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    import m2sa_jax
    from m2sa_jax.inference.server import create_app
    from m2sa_jax.inference.service import ServeSettings, Service, find_examples

    if not os.path.exists(args.checkpoint):
        hint = (" Train it first with `bash scripts/demo.sh`, or pass --checkpoint."
                if args.checkpoint == DEFAULT_CHECKPOINT else "")
        print(f"error: {args.checkpoint}: not found.{hint}", file=sys.stderr)
        return 2
    try:
        predictor = m2sa_jax.load(args.checkpoint, max_new_tokens=args.max_new_tokens)
        examples, toy = find_examples(args.checkpoint, args.examples)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        row_buckets = (tuple(int(x) for x in args.row_buckets.split(","))
                       if args.row_buckets else None)
    except ValueError:
        print(f"error: --row-buckets {args.row_buckets!r}: expected integers like 1,4,8",
              file=sys.stderr)
        return 2
    settings = ServeSettings(max_batch=args.max_batch, row_buckets=row_buckets,
                             batch_window_ms=args.batch_window_ms,
                             max_queue=args.max_queue, timeout_s=args.timeout,
                             max_prompt_tokens=args.max_prompt_tokens,
                             max_image_pixels=int(args.max_image_mp * 1e6),
                             max_body_bytes=int(args.max_body_mb * 2**20), api_key=args.api_key)
    try:
        service = Service(predictor, settings, name=os.path.basename(os.path.normpath(
            args.checkpoint)), examples=examples, toy_model=toy)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(service)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this "
              f"address can use the model", file=sys.stderr)
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port}/ (API docs at /docs); "
          f"compiling first, /api/health says when it is ready. The page's uploads live in "
          f"{service.temp_dir} (private, removed on exit).", flush=True)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
