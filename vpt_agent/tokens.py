"""The VPT vocabulary and the parser of generated text into typed actions (the prompts that
surround them are in `vpt_agent.prompts`).

This module is the single owner of token semantics. The parsing rules follow the reference
evaluation (see ``tests/fixtures/reference/region_cases.json``):

* A region is a match of ``<|region_token_start|>(<|[xy]_[0-7]|>)+<|region_token_end|>``; the
  x and y tokens inside one match are taken as sets. Matches are found left to right without
  overlap, so in ``start start x y end`` the second start opens the region.
* A re-encoding action is requested by the mere presence of its ``<|X_action_start|>`` token
  (the action and end tokens are not required), as the reference decides.
* Tokens that open nothing are ignored: stray ``<|x_i|>``/``<|y_j|>``, a lone
  ``<|region_token_end|>``, ``<|X_action|>`` without its start token.
* More than one kind of action (regions, dino, clip, sam) in one answer: the answer is final
  (kind ``"finished_mixed"``).

Where the reference silently drops a sample or takes malformed text as the answer, this parser
records an error (kind ``"error"``, never an exception) and no action is taken:

* a matched region without any x or without any y token (the reference crashes on it and loses
  the whole answer, so the other regions of that answer are not cropped either);
* a ``<|region_token_start|>`` that yields no region: ``"unclosed region"`` when the last start
  token has no end token after it, otherwise ``"malformed region"`` (empty pair, ``<|x_8|>``,
  text inside the pair, ...);
* an action for a branch outside ``allowed_branches``.

A malformed region next to a well-formed one is ignored, as in the reference.

A final answer (kind ``"none"`` or ``"finished_mixed"``) is checked apart by :func:`answer_problem`:
one that is empty once special tokens are removed, or (kind ``"none"``) that holds VPT tokens at all,
which can only be stray ones there, is not an answer.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Set
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import (
    BadImageError,
    BadModelOutputError,
    ConfigError,
    InputMismatchError,
    MissingBranchError,
    VPTError,
)

# --- chat tokens (Qwen2-VL) -------------------------------------------------------------------
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
CHAT_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# --- region selection ---------------------------------------------------------------------------
NUM_CUT = 8
"""The image is cut into a NUM_CUT × NUM_CUT grid of cells."""
REGION_START = "<|region_token_start|>"
REGION_END = "<|region_token_end|>"
X_TOKENS: tuple[str, ...] = tuple(f"<|x_{i}|>" for i in range(NUM_CUT))
Y_TOKENS: tuple[str, ...] = tuple(f"<|y_{i}|>" for i in range(NUM_CUT))
REGION_TOKENS: tuple[str, ...] = (REGION_START, REGION_END, *X_TOKENS, *Y_TOKENS)
IMAGE_PLACEHOLDER = "<image>"
"""Where an image goes in a user turn (LLaMA-Factory's placeholder, expanded by the template)."""

# --- re-encoding branches -----------------------------------------------------------------------
BranchName = Literal["dino", "sam", "clip"]
GridTHW = tuple[int, int, int]


@dataclass(frozen=True)
class Branch:
    """A re-encoding branch: its token prefix, config fields and placeholder count."""

    name: BranchName
    prefix: str
    fixed_placeholders: int | None
    """Placeholder tokens per image; None means t·h·w/4 of the Qwen2-VL image grid."""

    @property
    def action_start(self) -> str:
        return f"<|{self.prefix}_action_start|>"

    @property
    def action(self) -> str:
        return f"<|{self.prefix}_action|>"

    @property
    def action_end(self) -> str:
        return f"<|{self.prefix}_action_end|>"

    @property
    def image_pad(self) -> str:
        return f"<|{self.prefix}_image_pad|>"

    @property
    def tokens(self) -> tuple[str, str, str, str]:
        """Start, action, end and placeholder tokens, in vocabulary order."""
        return (self.action_start, self.action, self.action_end, self.image_pad)

    @property
    def action_text(self) -> str:
        """The assistant turn that requests this branch."""
        return self.action_start + self.action + self.action_end

    @property
    def start_field(self) -> str:
        """Config field holding the id of ``action_start``."""
        return f"{self.prefix}_action_start_id"

    @property
    def action_field(self) -> str:
        """Config field holding the id of ``action``."""
        return f"{self.prefix}_action_id"

    @property
    def pad_field(self) -> str:
        """Config field holding the id of ``image_pad``."""
        return f"{self.prefix}_image_token_id"

    @property
    def config_fields(self) -> dict[str, str]:
        """VPT config field name → token."""
        return {self.start_field: self.action_start, self.action_field: self.action, self.pad_field: self.image_pad}

    def num_placeholders(self, grid_thw: GridTHW | None = None) -> int:
        """Number of placeholder tokens for one image (``grid_thw`` is needed for clip)."""
        if self.fixed_placeholders is not None:
            return self.fixed_placeholders
        if grid_thw is None:
            raise InputMismatchError(f"branch {self.name!r} needs the image grid (t, h, w)")
        t, h, w = grid_thw
        if min(t, h, w) < 1 or (t * h * w) % 4:
            raise InputMismatchError(f"image grid {tuple(grid_thw)} is not a positive multiple of the 2×2 merge")
        return t * h * w // 4

    def placeholder_text(self, grid_thw: GridTHW | None = None) -> str:
        """The user turn content that receives the branch features."""
        return VISION_START + self.image_pad * self.num_placeholders(grid_thw) + VISION_END


BRANCHES: Mapping[str, Branch] = MappingProxyType(
    {b.name: b for b in (Branch("dino", "detection", 256), Branch("clip", "clip", None), Branch("sam", "seg", 256))}
)
"""The re-encoding branches in vocabulary order (detection, clip, seg)."""

BRANCH_TOKENS: tuple[str, ...] = tuple(tok for b in BRANCHES.values() for tok in b.tokens)
ACTION_STARTS: tuple[str, ...] = (REGION_START, *(b.action_start for b in BRANCHES.values()))
"""The tokens that open a perception request (never generated in direct mode)."""
VPT_SPECIAL_TOKENS: tuple[str, ...] = (*REGION_TOKENS, *BRANCH_TOKENS)
ALL_SPECIAL_TOKENS: tuple[str, ...] = (*CHAT_TOKENS, *VPT_SPECIAL_TOKENS)

CONFIG_TOKEN_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        **{field: tok for b in BRANCHES.values() for field, tok in b.config_fields.items()},
        "para_start_id": IM_START,
        "para_end_id": IM_END,
    }
)
"""VPT / Qwen2-VL config field → the token whose id it holds."""

# --- typed actions ------------------------------------------------------------------------------
Cell = Annotated[int, Field(ge=0, le=NUM_CUT - 1)]
Cells = tuple[Cell, Cell, Cell, Cell]
"""Grid cells (x_min, y_min, x_max, y_max), inclusive."""
Box = tuple[int, int, int, int]
"""Pixel box (x0, y0, x1, y1) on the original image, right/bottom exclusive (PIL crop order)."""


class RegionSelection(BaseModel):
    """One region the model selected."""

    model_config = ConfigDict(frozen=True)

    cells: Cells
    cells_with_margin: Cells
    box: Box | None = None


class ReEncode(BaseModel):
    """A request to re-encode the image with one branch."""

    model_config = ConfigDict(frozen=True)

    branch: BranchName

    @property
    def spec(self) -> Branch:
        """The branch's entry in BRANCHES."""
        return BRANCHES[self.branch]


OutputKind = Literal["none", "region", "reencode", "finished_mixed", "error"]
_ERROR_TYPES = {cls.__name__: cls for cls in (BadModelOutputError, MissingBranchError)}


class ParsedOutput(BaseModel):
    """What a generated answer asks for.

    ``none``: a final answer; ``region``: crop ``regions`` (in order); ``reencode``: run
    ``reencode.branch``; ``finished_mixed``: several kinds of action, taken as final; ``error``: a
    malformed or disallowed request, described by ``error`` (no action is taken).
    """

    model_config = ConfigDict(frozen=True)

    kind: OutputKind
    regions: tuple[RegionSelection, ...] = ()
    reencode: ReEncode | None = None
    error: str | None = None
    error_type: Literal["BadModelOutputError", "MissingBranchError"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParsedOutput:
        if (self.kind == "region") != bool(self.regions):
            raise ValueError("regions are given exactly when kind is 'region'")
        if (self.kind == "reencode") != (self.reencode is not None):
            raise ValueError("reencode is given exactly when kind is 'reencode'")
        if (self.kind == "error") != (self.error is not None) or (self.error is None) != (self.error_type is None):
            raise ValueError("error and error_type are given exactly when kind is 'error'")
        return self

    def exception(self) -> VPTError | None:
        """The recorded error as a typed exception (not raised), or None."""
        if self.error_type is None:
            return None
        return _ERROR_TYPES[self.error_type](self.error)


# --- region geometry ----------------------------------------------------------------------------
def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise BadImageError(f"image size must be (width, height), got {image_size!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise BadImageError(f"image size must be two positive ints, got {image_size!r}")
    return width, height


def region_box(
    cells_selected: tuple[int, int, int, int], image_size: tuple[int, int] | None
) -> tuple[Cells, Box | None]:
    """Selected cells → (cells with a one-cell margin clamped to the grid, pixel box or None).

    The box is computed on the original ``(width, height)`` as the reference does: cell size
    ``W / 8`` in float, ``x0 = int(x_min · W/8)``, ``x1 = int((x_max + 1) · W/8)``, same for y.
    On a side under 8 px, where that can give an empty box (the reference crashes there), the box
    keeps at least 1 px: ``x1 = max(x1, x0 + 1)``.
    """
    x_min, y_min, x_max, y_max = cells_selected
    if not (0 <= x_min <= x_max < NUM_CUT and 0 <= y_min <= y_max < NUM_CUT):
        raise InputMismatchError(
            f"cells {tuple(cells_selected)} are not (x_min, y_min, x_max, y_max) in [0, {NUM_CUT - 1}]"
        )
    margin = (max(x_min - 1, 0), max(y_min - 1, 0), min(x_max + 1, NUM_CUT - 1), min(y_max + 1, NUM_CUT - 1))
    if image_size is None:
        return margin, None
    width, height = _check_image_size(image_size)
    cell_w, cell_h = width / NUM_CUT, height / NUM_CUT
    x0, y0 = int(margin[0] * cell_w), int(margin[1] * cell_h)  # < width, < height: margin ≤ 7
    box = (x0, y0, max(int((margin[2] + 1) * cell_w), x0 + 1), max(int((margin[3] + 1) * cell_h), y0 + 1))
    return margin, box


# --- parser -------------------------------------------------------------------------------------
REGION_PATTERN = re.compile(r"<\|region_token_start\|>(?:<\|[xy]_[0-7]\|>)+<\|region_token_end\|>")
"""One region: the reference evaluation's regex (README §8)."""
_CELL_PATTERN = re.compile(r"<\|([xy])_([0-7])\|>")


def _error(message: str, error_type: type[VPTError]) -> ParsedOutput:
    return ParsedOutput(kind="error", error=message, error_type=error_type.__name__)


def parse_actions(
    text: str,
    image_size: tuple[int, int] | None = None,
    allowed_branches: Set[str] | None = None,
) -> ParsedOutput:
    """Parse generated text (special tokens kept) into the action it requests; never raises on text.

    ``image_size`` (width, height) of the original image fills each region's pixel box;
    ``allowed_branches`` (default: all) limits which re-encoding branches may be requested.
    """
    if image_size is not None:
        _check_image_size(image_size)
    if allowed_branches is not None and not set(allowed_branches) <= set(BRANCHES):
        raise ConfigError(f"unknown branches {sorted(set(allowed_branches) - set(BRANCHES))}")

    matches = list(REGION_PATTERN.finditer(text))
    branches = [b for b in BRANCHES.values() if b.action_start in text]
    if len(branches) + bool(matches) > 1:
        return ParsedOutput(kind="finished_mixed")

    if branches:
        branch = branches[0]
        if allowed_branches is not None and branch.name not in allowed_branches:
            return _error(
                f"the model requested the {branch.name!r} branch ({branch.action_start}), "
                f"which is not available (available: {sorted(allowed_branches)})",
                MissingBranchError,
            )
        return ParsedOutput(kind="reencode", reencode=ReEncode(branch=branch.name))

    if matches:
        regions = []
        for i, match in enumerate(matches):
            found = _CELL_PATTERN.findall(match.group())
            xs = {int(v) for axis, v in found if axis == "x"}
            ys = {int(v) for axis, v in found if axis == "y"}
            if not xs or not ys:
                missing = "x" if not xs else "y"
                return _error(f"region {i} {match.group()!r} has no {missing} cell", BadModelOutputError)
            cells = (min(xs), min(ys), max(xs), max(ys))
            margin, box = region_box(cells, image_size)
            regions.append(RegionSelection(cells=cells, cells_with_margin=margin, box=box))
        return ParsedOutput(kind="region", regions=tuple(regions))

    last_start = text.rfind(REGION_START)
    if last_start < 0:
        return ParsedOutput(kind="none")
    if REGION_END not in text[last_start:]:
        return _error(f"unclosed region: {REGION_START} without {REGION_END}", BadModelOutputError)
    return _error(
        f"malformed region: a region pair must hold <|x_i|> and <|y_j|> tokens (0 ≤ i, j < {NUM_CUT}) only",
        BadModelOutputError,
    )



_SPECIAL_PATTERN = re.compile("|".join(re.escape(token) for token in ALL_SPECIAL_TOKENS))


def answer_problem(text: str, parsed: ParsedOutput) -> BadModelOutputError | None:
    """Why the final answer `text` (special tokens kept, parsed as `parsed`) is not usable, or None:
    nothing visible once special tokens are removed, or VPT tokens outside any well-formed action
    (stray ``<|x_i|>`` / ``<|y_j|>``, a region end without its start, an action token without its
    start: in a ``"none"`` answer every VPT token is one of these)."""
    if parsed.kind not in ("none", "finished_mixed"):
        raise InputMismatchError(f"a {parsed.kind!r} output is not a final answer")
    if parsed.kind == "none" and (stray := [t for t in VPT_SPECIAL_TOKENS if t in text]):
        return BadModelOutputError(f"VPT tokens outside a well-formed action in the answer: {', '.join(stray)}")
    if not _SPECIAL_PATTERN.sub("", text).strip():
        return BadModelOutputError("the answer is empty")
    return None
