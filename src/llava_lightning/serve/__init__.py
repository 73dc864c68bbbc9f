"""`python -m llava_lightning serve`: an OpenAI-compatible chat server (`/v1/chat/completions`, `/v1/models`)
and a web chat page (Gradio) on one model (docs/serving.md).

`server.py` builds the app and runs it; `engine.py` owns the model (one generation at a time, a cap on
requests in flight); `openai_api.py` turns request bodies into messages and replies into OpenAI's shapes;
`images.py` decides where an image may come from; `web.py` is the page. Needs the `serve` extra.
"""
