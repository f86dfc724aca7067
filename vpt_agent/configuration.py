"""Runtime options of the VPT graph: given to `build_graph`, overridable per run through
``config["configurable"]`` (same names)."""
from __future__ import annotations

from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError
from .images import MAX_PIXELS, MAX_QUESTION_CHARS, MAX_SIDE
from .model.session import DEFAULT_SYSTEM
from .prompts import PromptMode

ActionName = Literal["region", "dino", "sam", "clip"]
"""A perception action: region selection or one re-encoding branch."""


class VPTOptions(BaseModel):
    """What one run may do and how it prompts the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_perception_steps: int = Field(2, ge=0)
    """Perception actions carried out per run; a further request is refused and the run answers."""
    max_new_tokens: int = Field(64, ge=1)
    """Tokens the model may generate per round (after any forced ones)."""
    allowed_actions: tuple[ActionName, ...] = ("region", "dino", "sam", "clip")
    """Actions the run may carry out (re-encoding also needs the branch in the model)."""
    mode: PromptMode = "region"
    """Prompt: the paper's "region" or "reencode" suffix, "free" (none, the model decides) or
    "direct" (none, and no perception at all: action start tokens are never generated)."""
    force: tuple[str, ...] = ()
    """Text teacher-forced at the start of round i (special tokens allowed; generation goes on
    after it unless it ends with a stop token), e.g.
    ``("<|region_token_start|><|x_2|><|y_5|><|region_token_end|>",)``: runs any route on any weights."""
    system_prompt: str = DEFAULT_SYSTEM
    """Trusted text, like `force`: special tokens in it are read as tokens (never so in the question)."""
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    max_side: int = Field(MAX_SIDE, ge=1)
    max_question_chars: int = Field(MAX_QUESTION_CHARS, ge=1)
    truncate_question: bool = False
    """A longer question is rejected (BadQuestionError), or with this cut to `max_question_chars`
    characters and answered, the cut recorded as the run's error."""

    @classmethod
    def build(cls, **values: Any) -> VPTOptions:
        """Validated options; `ConfigError` names what is wrong."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid VPT options: {problems}") from None

    def merged(self, config: RunnableConfig | None) -> VPTOptions:
        """These options updated by the known names in ``config["configurable"]``."""
        configurable = (config or {}).get("configurable") or {}
        updates = {k: v for k, v in configurable.items() if k in type(self).model_fields}
        return self.build(**{**self.model_dump(), **updates}) if updates else self

    def allows(self, action: str) -> bool:
        return self.mode != "direct" and action in self.allowed_actions
