"""python -m services.chat_ui [--host 127.0.0.1] [--port 8501] [--base-url URL] [--model NAME]

Runs the Streamlit chat page against the gateway (`make chat-ui`). Flags default to TULPAR_CHAT_HOST / _PORT /
_BASE_URL / _MODEL, then the container conventions HOST, PORT and TULPAR_GATEWAY_URL (what the Helm chart sets).
The API key comes from TULPAR_CHAT_API_KEY (or OPENAI_API_KEY), never from a flag, so it stays out of `ps`
listings. Streamlit's own health check is GET /_stcore/health.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.chat_ui.client import DEFAULT_BASE_URL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.chat_ui", description=__doc__.split("\n\n")[0])
    env = os.environ.get
    p.add_argument("--host", default=env("TULPAR_CHAT_HOST") or env("HOST") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(env("TULPAR_CHAT_PORT") or env("PORT") or "8501"))
    p.add_argument(
        "--base-url",
        default=env("TULPAR_CHAT_BASE_URL") or env("TULPAR_GATEWAY_URL") or DEFAULT_BASE_URL,
        help="the gateway's OpenAI base URL (env TULPAR_CHAT_BASE_URL or TULPAR_GATEWAY_URL)",
    )
    p.add_argument("--model", default=os.environ.get("TULPAR_CHAT_MODEL"), help="model picked first")
    args = p.parse_args(argv)
    os.environ["TULPAR_CHAT_BASE_URL"] = args.base_url
    if args.model:
        os.environ["TULPAR_CHAT_MODEL"] = args.model
    if not (os.environ.get("TULPAR_CHAT_API_KEY") or os.environ.get("OPENAI_API_KEY")):
        print("note: TULPAR_CHAT_API_KEY is not set; users must paste a key in the sidebar", file=sys.stderr)
    from streamlit.web import cli as stcli

    sys.argv = [
        "streamlit",
        "run",
        str(Path(__file__).with_name("app.py")),
        f"--server.address={args.host}",
        f"--server.port={args.port}",
        "--server.headless=true",
        "--server.fileWatcherType=none",
        "--browser.gatherUsageStats=false",
        "--global.developmentMode=false",
        "--client.toolbarMode=minimal",
    ]
    return stcli.main()


if __name__ == "__main__":
    sys.exit(main())
