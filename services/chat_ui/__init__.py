"""Tulpar's chat web UI (Streamlit): talks to services.gateway with the OpenAI client and streams answers.

python -m services.chat_ui --port 8501 --base-url http://127.0.0.1:8080/v1   # key: TULPAR_CHAT_API_KEY
"""
