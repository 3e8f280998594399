"""A small client for mole-serve on top of the official `openai` package.

from mole_serve.client import MoleClient
client = MoleClient("http://127.0.0.1:8000")
print(client.chat("Write 587 in Roman numerals.", model="int_to_roman"))
for text in client.stream("Tell me about Paris."):
    print(text, end="", flush=True)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from openai import OpenAI
from openai.types.chat import ChatCompletion


class MoleClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None) -> None:
        # Without a key: OPENAI_API_KEY if set, else a placeholder (a server without MOLE_API_KEY takes any).
        self.openai = OpenAI(
            base_url=f"{base_url.rstrip('/')}/v1", api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none"
        )

    @staticmethod
    def _messages(prompt: str | list[dict]) -> list[dict]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt

    @staticmethod
    def _extra(adapters: list[str] | dict[str, float] | None) -> dict:
        """adapters: names, or {name: weight}; sent in the `adapters` extension field."""
        if adapters is None:
            return {}
        if isinstance(adapters, dict):
            return {"adapters": [{"name": n, "weight": w} for n, w in adapters.items()]}
        return {"adapters": list(adapters)}

    def complete(
        self,
        prompt: str | list[dict],
        model: str = "auto",
        adapters: list[str] | dict[str, float] | None = None,
        **kwargs,
    ) -> ChatCompletion:
        """The whole response object; `response.model_extra["adapters"]` names the adapters used."""
        return self.openai.chat.completions.create(
            model=model, messages=self._messages(prompt), extra_body=self._extra(adapters), **kwargs
        )

    def chat(
        self,
        prompt: str | list[dict],
        model: str = "auto",
        adapters: list[str] | dict[str, float] | None = None,
        **kwargs,
    ) -> str:
        return self.complete(prompt, model, adapters, **kwargs).choices[0].message.content

    def stream(
        self,
        prompt: str | list[dict],
        model: str = "auto",
        adapters: list[str] | dict[str, float] | None = None,
        **kwargs,
    ) -> Iterator[str]:
        chunks = self.openai.chat.completions.create(
            model=model, messages=self._messages(prompt), stream=True, extra_body=self._extra(adapters), **kwargs
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def models(self) -> list[str]:
        return [m.id for m in self.openai.models.list().data]
