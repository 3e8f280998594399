"""Stream a chat answer token by token (server on :8000)."""

import sys

from mole_serve.client import MoleClient

client = MoleClient(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
for text in client.stream("Tell me three facts about Paris.", temperature=0.7, seed=1, max_tokens=80):
    print(text, end="", flush=True)
print()
