"""``python -m kimi_ref.serve``: the OpenAI-compatible chat-completions endpoint (``pip install -e '.[serve]'``).

    python -m kimi_ref.serve                                 # kimi-nano on http://127.0.0.1:8000/v1
    python -m kimi_ref.serve --ckpt DIR --tp 8               # the real checkpoint on 8 GPUs; rank 0 serves
    python -m kimi_ref.serve --port 0                        # any free port: the "serving ..." line says which

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    r = client.chat.completions.create(model="kimi-nano", messages=[{"role": "user", "content": "What is 17*23?"}])
    r.choices[0].message.reasoning_content, r.choices[0].message.content, r.choices[0].message.tool_calls

One request, through the files of this package:

    body --requests.parse_chat_request--> ChatRequest (shapes.py)    400 naming the field, 413 if too big
         --prompt.PromptBuilder.prepare--> prompt ids, images, budget  the chat template, MoonViT preprocessing
         --engine.Engine.submit--> the queue (503 when full)           one generation at a time, rank 0 leads
         --generate() + turn.Turn--> deltas ... answer                 the kimi_k2 stream parser, stop strings
         --app--> chat.completion, or SSE chat.completion.chunk ... data: [DONE]

Requests are queued and run **one at a time**, in arrival order (``--max-queue`` may wait; more get a
503), and a client that disconnects stops its own generation. ``start()`` runs a server in background
threads of this process (notebooks, tests). See docs/serving.md for every field and error.
"""

from __future__ import annotations

from kimi_ref.serve.cli import main
from kimi_ref.serve.server import start

__all__ = ["start", "main"]
