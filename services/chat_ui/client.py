"""What the chat UI does, without the UI: settings from the environment and the OpenAI-client calls.

Settings (environment, or `python -m services.chat_ui` flags, which set them):
  TULPAR_CHAT_BASE_URL   the gateway's OpenAI base URL (else TULPAR_GATEWAY_URL)  default http://127.0.0.1:8080/v1
  TULPAR_CHAT_API_KEY    the gateway API key (else OPENAI_API_KEY); users may also paste one in the sidebar
  TULPAR_CHAT_MODEL      the model picked first                    default: the first the gateway lists
  TULPAR_CHAT_TITLE      the page title                            default "Tulpar chat"
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


@dataclass(frozen=True)
class ChatSettings:
    base_url: str = DEFAULT_BASE_URL
    api_key: str = ""
    model: str | None = None
    title: str = "Tulpar chat"
    timeout_s: float = 300.0

    @classmethod
    def from_env(cls) -> ChatSettings:
        return cls(
            base_url=(
                os.environ.get("TULPAR_CHAT_BASE_URL")
                or os.environ.get("TULPAR_GATEWAY_URL")
                or DEFAULT_BASE_URL
            ).rstrip("/"),
            api_key=os.environ.get("TULPAR_CHAT_API_KEY") or os.environ.get("OPENAI_API_KEY") or "",
            model=os.environ.get("TULPAR_CHAT_MODEL") or None,
            title=os.environ.get("TULPAR_CHAT_TITLE", "Tulpar chat"),
        )


def make_client(base_url: str, api_key: str, timeout_s: float = 300.0) -> openai.OpenAI:
    # the SDK refuses an empty key; the gateway then answers 401, which the UI shows
    return openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=1, timeout=timeout_s)


def list_models(client: openai.OpenAI) -> list[str]:
    return [m.id for m in client.models.list()]


def build_messages(history: list[dict[str, str]], system_prompt: str = "") -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    return msgs + [{"role": m["role"], "content": m["content"]} for m in history]


def stream_reply(
    client: openai.OpenAI,
    model: str,
    messages: list[dict[str, str]],
    *,
    temperature: float,
    top_p: float,
    max_tokens: int,
) -> Iterator[str]:
    """The assistant's answer, piece by piece as the server streams it."""
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stream=True,
    )
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    finally:
        stream.close()  # the user navigated away or pressed stop: let the server abort the generation


def describe_error(exc: Exception) -> str:
    """One line for the user: the gateway's OpenAI-format message when there is one."""
    if isinstance(exc, openai.APIStatusError):
        try:
            msg = exc.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = exc.message
        return f"{exc.status_code}: {msg}"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach the gateway ({type(exc).__name__}): is it running?"
    return f"{type(exc).__name__}: {exc}"
