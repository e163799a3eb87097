"""The Streamlit page (run by `python -m services.chat_ui`; `streamlit run` on this file works too).

Sidebar: API key (optional; the server's TULPAR_CHAT_API_KEY otherwise), model picker filled from the gateway's
/v1/models, temperature, top-p, max tokens, system prompt, "New chat". The answer streams in token by token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

try:
    from services.chat_ui import client as chat
except ImportError:  # `streamlit run services/chat_ui/app.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from services.chat_ui import client as chat

settings = chat.ChatSettings.from_env()
st.set_page_config(page_title=settings.title, page_icon=":speech_balloon:", layout="centered")


@st.cache_resource(show_spinner=False)
def get_client(base_url: str, api_key: str):
    return chat.make_client(base_url, api_key, settings.timeout_s)


@st.cache_data(ttl=30, show_spinner=False)
def get_models(base_url: str, api_key: str) -> list[str]:
    return chat.list_models(get_client(base_url, api_key))


if "messages" not in st.session_state:
    st.session_state.messages = []

with st.sidebar:
    st.header(settings.title)
    st.caption(f"Gateway: `{settings.base_url}`")
    typed_key = st.text_input("API key", type="password", help="Leave empty to use the server's key")
    api_key = typed_key or settings.api_key
    try:
        models = get_models(settings.base_url, api_key)
        models_error = None
    except Exception as exc:  # shown to the user; the page stays usable once the gateway answers
        models, models_error = [], chat.describe_error(exc)
    if models_error:
        st.error(f"Cannot list models: {models_error}")
    default = models.index(settings.model) if settings.model in models else 0
    model = st.selectbox("Model", models, index=default if models else None, placeholder="no models")
    temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, help="0 = greedy")
    top_p = st.slider("Top-p", 0.05, 1.0, 1.0, 0.05, help="nucleus sampling: keep the smallest set of tokens "
                      "whose probabilities add up to this")  # fmt: skip
    max_tokens = st.number_input("Max tokens", min_value=1, max_value=8192, value=256, step=32)
    system_prompt = st.text_area("System prompt", "", height=80)
    if st.button("New chat", width="stretch"):
        st.session_state.messages = []
        st.rerun()

st.title(settings.title)
for m in st.session_state.messages:
    with st.chat_message(m["role"]):
        st.markdown(m["content"])

prompt = st.chat_input("Message", disabled=not model)
if prompt:
    st.session_state.messages.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        try:
            answer = st.write_stream(
                chat.stream_reply(
                    get_client(settings.base_url, api_key),
                    model,
                    chat.build_messages(st.session_state.messages, system_prompt),
                    temperature=float(temperature),
                    top_p=float(top_p),
                    max_tokens=int(max_tokens),
                )
            )
        except Exception as exc:
            answer = None
            st.error(chat.describe_error(exc))
    if isinstance(answer, str) and answer:
        st.session_state.messages.append({"role": "assistant", "content": answer})
    elif answer is None:
        st.session_state.messages.pop()  # let the user resend after fixing the key/model
