"""python -m services.gateway --config configs/gateway/local.yaml [dotted.key=value ...]

Serves the public API on host:port and, unless admin.port is null, the admin listener (GET /metrics, detailed
GET /health) on admin.host:admin.port, both in one event loop; SIGTERM/SIGINT stop both (gracefully for the API).
Exit codes follow jobs.platform.runtime: 2 for a user error (bad config, missing keys, an alias that does not resolve,
an unusable state_dir), printed as `error: <message>` without a traceback; 1 for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys

from jobs.platform.runtime import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR


async def serve(gateway) -> None:
    """The public listener and, unless admin.port is null, the admin listener, in one event loop."""
    import uvicorn

    cfg = gateway.cfg
    public = uvicorn.Server(
        uvicorn.Config(
            gateway.app,
            host=cfg.host,
            port=cfg.port,
            log_level=cfg.log_level,
            limit_concurrency=cfg.limit_concurrency,
            timeout_graceful_shutdown=30,
            proxy_headers=False,
        )
    )
    if cfg.admin.port is None:
        await public.serve()
        return

    class AdminServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the public server handles the signals and then stops this one
            yield

    admin = AdminServer(
        uvicorn.Config(
            gateway.admin_app,
            host=cfg.admin.host,
            port=cfg.admin.port,
            log_level=cfg.log_level,
            lifespan="off",
            access_log=False,
            proxy_headers=False,
        )
    )
    admin_task = asyncio.create_task(admin.serve())
    try:
        await public.serve()
    finally:
        admin.should_exit = True
        await admin_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="Tulpar API gateway. Overrides are dotted key=value pairs, e.g. port=8081; env "
        "TULPAR_GATEWAY__<SECTION>__<KEY> also overrides the file.",
    )
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("TULPAR_GATEWAY_CONFIG") or None,
        help="YAML config, e.g. configs/gateway/local.yaml (default: $TULPAR_GATEWAY_CONFIG, else built-in defaults)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied last")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        from services.gateway.app import Gateway
        from services.gateway.config import load_gateway_config

        cfg = load_gateway_config(args.config, args.overrides)
        logging.getLogger().setLevel(cfg.log_level.upper())
        gateway = Gateway(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        logging.exception("gateway failed to start")
        return EXIT_INTERNAL_ERROR

    log = logging.getLogger("tulpar.gateway")
    log.info(
        "gateway on http://%s:%d/v1 -> %s; models: %s",
        cfg.host,
        cfg.port,
        cfg.upstream.base_url,
        ", ".join(gateway.router.public_models()) or "(from upstream)",
    )
    if cfg.admin.port is not None:
        log.info("admin (metrics, detailed health) on http://%s:%d", cfg.admin.host, cfg.admin.port)
    import uvicorn

    # the event loop `uvicorn.run` would pick (uvloop where installed, else asyncio's): both servers share it
    loop_factory = uvicorn.Config(gateway.app, loop="auto").get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(gateway))
    return 0


if __name__ == "__main__":
    sys.exit(main())
