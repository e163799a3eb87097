"""Serving registered Tulpar models with Ray Serve LLM (vLLM) behind an OpenAI-compatible API.

`python -m services.llm_serve --model models:/<name>@<alias>` locally; `services.llm_serve.app:build_app` as the
import path of a RayService on Kubernetes. Settings: services.llm_serve.config.ServeConfig.
"""
