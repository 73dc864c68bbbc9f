"""A request the server refuses: an HTTP status and OpenAI's error body."""

from __future__ import annotations


class ApiError(Exception):
    """Refuse a request with `status` and `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        if self.status == 403:
            return "permission_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
