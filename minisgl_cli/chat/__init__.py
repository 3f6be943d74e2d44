"""`minisgl chat`: a terminal REPL over the in-process engine or any OpenAI-compatible server.

conversation.py  the chat's state: system prompt, turns, sampling settings
commands.py      slash commands, parsed and checked before they run
transcript.py    /save (JSON or Markdown) and /load (JSON)
backend.py       what the REPL needs from a model (stream text deltas with token counts)
engine_backend.py, openai_backend.py   the two backends: in-process LLM, HTTP server
stats.py         tokens, tokens/s and time to first token of one answer
inputs.py        where prompts come from: prompt_toolkit on a terminal, or piped lines
render.py        how answers are shown: live Markdown, or raw text
repl.py          the loop that ties them together
"""
