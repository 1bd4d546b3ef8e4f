"""What the service accepts (:class:`ServeSettings`) and how it refuses the rest (:class:`ApiError`,
:class:`ClientGone`): the vocabulary shared by the decode, predict and encode steps, the middleware and the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


@dataclass
class ServeSettings:
    max_batch: int = 8  # photos per engine call: on 2 CPU cores 8 beat 16 (RESULTS); GPUs want more
    max_wait_ms: float = 5.0  # how long a batch waits for more photos once it has one
    max_files: int = 16  # photos per request
    max_file_bytes: int = 10 * MiB  # per photo
    max_pixels: int = 40_000_000  # width x height, checked from the header before decoding (decompression bombs)
    max_queue: int = 256  # photos waiting for inference beyond which requests get 503 (back-pressure)
    top_k: int = 5  # default k of top-k (capped at the class count when a request gives none)
    body_timeout_s: float = 60.0  # the whole request body must arrive within this (slow clients: 408)
    max_upload_bytes: int = 256 * MiB  # request-body bytes held by all uploads in flight (503 busy beyond)
    api_key: str | None = None  # when set, /v1/* need the header X-API-Key with this value; /docs is closed

    @property
    def max_request_bytes(self) -> int:
        return self.max_files * self.max_file_bytes + MiB  # the multipart framing around the files

    def check(self) -> None:
        from carclf.errors import CarclfError

        for name in ("max_batch", "max_files", "max_file_bytes", "max_queue", "top_k"):
            if getattr(self, name) < 1:
                raise CarclfError(f"serve: {name} must be at least 1")
        if self.max_wait_ms < 0 or self.max_pixels < 0:
            raise CarclfError("serve: max_wait_ms and max_pixels must be 0 or more")
        if self.body_timeout_s <= 0:
            raise CarclfError("serve: body_timeout_s must be more than 0")
        if self.max_upload_bytes < self.max_file_bytes + MiB:
            raise CarclfError(f"serve: max_upload_bytes ({self.max_upload_bytes:,}) must hold at least one photo of "
                              f"max_file_bytes ({self.max_file_bytes:,}) and its framing (1 MiB)")


class ClientGone(Exception):
    """The client closed the connection before its request body arrived: counted as 499, nothing is answered."""


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` with a machine-readable ``code`` and a sentence."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}
