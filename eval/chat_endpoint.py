"""The OpenAI-compatible client lives in the shared kernel (train/chat_endpoint.py); this name keeps old imports working."""

from train.chat_endpoint import MAX_BODY_BYTES, ChatEndpoint, EndpointError, retry_after_s

__all__ = ["MAX_BODY_BYTES", "ChatEndpoint", "EndpointError", "retry_after_s"]
