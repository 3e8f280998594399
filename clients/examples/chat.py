"""Chat with automatic selection, a named adapter, and a weighted set (server on :8000)."""

import sys

from mole_serve.client import MoleClient

client = MoleClient(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
print("models:", client.models())
print("auto:", client.chat("What is the capital of France?", temperature=0, max_tokens=30))
print("int_to_roman:", client.chat("Write 587 in Roman numerals.", model="int_to_roman", temperature=0))
response = client.complete(
    "What is XLII as a number?", adapters={"roman_to_int": 0.8, "int_to_roman": 0.2}, temperature=0, max_tokens=12
)
print("weighted set:", response.choices[0].message.content, response.model_extra["adapters"])
