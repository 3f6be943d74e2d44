"""A chat's state: the system prompt, the turns so far, and the sampling settings of the next answer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from minisgl_cli.config import SamplingConfig

SYSTEM = "system"
USER = "user"
ASSISTANT = "assistant"


@dataclass
class Message:
    role: str  # SYSTEM, USER or ASSISTANT
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    settings: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None  # sent first when set
    turns: list[Message] = field(default_factory=list)  # user, assistant, user, assistant, ...
    json_schema: dict[str, Any] | None = None  # answers are JSON matching it; None: free text
    # The settings the user chose (flag, env, config file, /set, a loaded transcript): a server (--url) is sent
    # only these, so its own defaults (the model's generation_config.json) apply to the rest.
    chosen: frozenset[str] = frozenset()

    def messages(self, prompt: str | None = None) -> list[dict[str, str]]:
        """What a backend is sent: the system prompt, every turn, then the new prompt (if any)."""
        messages = [Message(SYSTEM, self.system)] if self.system else []
        messages += self.turns
        if prompt is not None:
            messages.append(Message(USER, prompt))
        return [m.as_dict() for m in messages]

    def add_turn(self, prompt: str, answer: str) -> None:
        self.turns += [Message(USER, prompt), Message(ASSISTANT, answer)]

    def reset(self) -> None:
        """Forget the turns; the system prompt and settings stay, as they were chosen, not said."""
        self.turns.clear()

    def change(self, name: str, value: Any) -> None:
        """Set one sampling setting (SamplingConfig validates it again)."""
        self.settings = dataclasses.replace(self.settings, **{name: value})
        self.chosen |= {name}
