"""`python -m services.llm_serve --model models:/<name>@<alias> [--config configs/serve/<name>.yaml] [k=v ...]`

Serves registered models with Ray Serve + vLLM behind an OpenAI-compatible endpoint (http://host:port/v1) on the
local Ray (or RAY_ADDRESS), until interrupted. With --model alone, a one-model app with the defaults of
ServeConfig; --config gives the whole app (several models, LoRA, autoscaling); --model then replaces the first
model's source. Problems with a model stop it before Ray starts, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from jobs.platform.configfile import apply_overrides, load_config, validate_config
from jobs.platform.results import EndpointOutputs, StageResult
from jobs.platform.runtime import EXIT_USER_ERROR, Settings
from services.llm_serve.app import build_from, prepare
from services.llm_serve.config import ServeConfig


def parse(argv: list[str] | None) -> tuple[ServeConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m services.llm_serve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version> or an HF directory")
    parser.add_argument("--config", help="a ServeConfig YAML (configs/serve/<name>.yaml)")
    parser.add_argument("--check", action="store_true", help="resolve and validate the models, then exit")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. port=8001 use_gpu=true"
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.model:
        overrides.insert(0, f"models.0.source={args.model}")
    if args.config is None and not args.model:
        raise ValueError("pass --model models:/<name>@<alias> (or --config configs/serve/<name>.yaml)")
    base = (
        {"models": [{"source": args.model}]}
        if args.config is None
        else load_config(ServeConfig, args.config).model_dump()
    )
    return _apply(base, overrides), args.check


def _apply(data: dict, overrides: list[str]) -> ServeConfig:
    return validate_config(ServeConfig, apply_overrides(data, overrides), "serve config")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, check_only = parse(argv)
        settings = Settings.from_env()
        resolved = prepare(cfg, settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"stage": "serve", "status": "error", "error": str(exc)}))
        return EXIT_USER_ERROR
    summary = {m.served_name: m.uri for m in resolved}
    if check_only:
        print(StageResult(stage="serve", outputs=EndpointOutputs(models=summary)).model_dump_json())
        return 0

    if cfg.throughput_optimized and settings.ray_address in (None, "local"):
        # Read by Ray Serve's controller and replicas when they start: it must be in the environment of the local
        # Ray this process starts (a cluster's Ray has its own environment: docs/serving.md).
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    import ray
    from ray import serve

    from jobs.platform.raycluster import init_ray

    init_ray(settings)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_from(cfg, resolved), name=cfg.app_name, route_prefix="/", blocking=False)
    url = f"http://{cfg.host}:{cfg.port}/v1"
    print(
        StageResult(stage="serve", outputs=EndpointOutputs(url=url, models=summary)).model_dump_json(),
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
