"""The paper's 0-1 LLM-judge score, from any OpenAI-compatible chat completions endpoint."""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Protocol

from ..errors import VPTError

JUDGE_PROMPT = (
    "Grade a model's answer to a question about an image against the reference answer. "
    "Give 1 when it means the same as the reference, 0 when it is wrong or unrelated, and a value "
    "in between when it is partly right. Reply with 'score: ' and a number from 0 to 1, nothing else.\n\n"
    "Question: {question}\nReference answer: {truth}\nModel's answer: {answer}"
)
_SCORE = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class JudgeError(VPTError):
    """The judge endpoint failed or answered without a score."""


class Judge(Protocol):
    def __call__(self, question: str, answer: str, truth: str) -> float:
        """A score in [0, 1] for `answer` given the reference `truth`."""
        ...


class OpenAIJudge:
    """Scores answers with a chat model behind an OpenAI-compatible endpoint.

    `url`: the API base (``https://api.openai.com/v1``, a vLLM server's ``http://host:8000/v1``) or
    its full ``/chat/completions`` address. The key comes from `api_key` or ``OPENAI_API_KEY``.
    """

    def __init__(
        self, url: str, model: str = "gpt-4o", *, api_key: str | None = None, timeout: float = 60.0, retries: int = 3
    ) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def __call__(self, question: str, answer: str, truth: str) -> float:
        prompt = JUDGE_PROMPT.format(question=question, truth=truth, answer=answer)
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        reply = self._post(body)
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"the judge's reply has no message: {str(reply)[:200]}") from None
        return parse_score(text)

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        failure: Exception | None = None
        for attempt in range(max(1, self.retries)):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
                failure = exc
        raise JudgeError(f"the judge at {self.url} failed: {failure}") from failure


def parse_score(text: str) -> float:
    """The score in a judge's reply ("score: 0.8", or the first number), clamped to [0, 1]."""
    match = _SCORE.search(text) or _NUMBER.search(text)
    if match is None:
        raise JudgeError(f"no score in the judge's reply: {text[:200]!r}")
    return min(1.0, max(0.0, float(match.group(match.lastindex or 0))))
