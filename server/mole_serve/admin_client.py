"""Admin helpers for mole-serve's /admin/adapters routes (httpx).

from mole_serve.admin_client import AdminClient
admin = AdminClient("http://127.0.0.1:8000", token="...")   # or MOLE_ADMIN_TOKEN
admin.upload("path/to/peft_folder_or_archive.zip", name="my_task")
admin.list(); admin.get("my_task"); admin.update("my_task", examples=[...]); admin.delete("my_task")
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "card.json")


class AdminError(RuntimeError):
    """The server refused: `status` and the OpenAI-shaped error message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class AdminClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 120) -> None:
        token = token or os.environ.get("MOLE_ADMIN_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise AdminError(r.status_code, message)
        return r.json()

    def upload(self, path: str | Path, name: str | None = None, replace: bool = False) -> dict:
        """A PEFT folder (adapter_config.json, adapter_model.safetensors, card.json) or one
        .zip / .tar.gz holding them. Returns the stored card, nearest adapters and load time."""
        path = Path(path)
        if path.is_dir():
            missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{path} lacks {', '.join(missing)}")
            files = [("files", (f, (path / f).read_bytes())) for f in ADAPTER_FILES]
        else:
            files = [("files", (path.name, path.read_bytes()))]
        data = {"name": name} if name else {}
        return self._call(
            "POST", "/admin/adapters", params={"replace": "true"} if replace else None, files=files, data=data
        )

    def list(self, offset: int = 0, limit: int = 50) -> dict:
        return self._call("GET", "/admin/adapters", params={"offset": offset, "limit": limit})

    def list_all(self) -> list[dict]:
        """Every adapter, following the pages."""
        out, offset = [], 0
        while offset is not None:
            page = self.list(offset, 500)
            out += page["data"]
            offset = page["next_offset"]
        return out

    def get(self, name: str) -> dict:
        return self._call("GET", f"/admin/adapters/{name}")

    def update(self, name: str, description: str | None = None, examples: list[str] | None = None) -> dict:
        body = {k: v for k, v in {"description": description, "examples": examples}.items() if v is not None}
        return self._call("PATCH", f"/admin/adapters/{name}", json=body)

    def delete(self, name: str) -> dict:
        return self._call("DELETE", f"/admin/adapters/{name}")

    def close(self) -> None:
        self.http.close()
