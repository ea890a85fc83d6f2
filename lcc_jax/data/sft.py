"""Tokenizing prompt/response pairs for supervised fine-tuning, with the loss on response tokens only.

The reference (RestoreLCC's `RestoreLCC_train.py`) feeds `prompt.strip() + response` to trl's
SFTTrainer (tokenizer defaults, so BOS where the tokenizer adds one; truncation to 500 tokens from
the right) and masks the loss with `DataCollatorForCompletionOnlyLM`: every token up to and
including the response template ("\\n\\n### Response:") is ignored; the tokens after it are targets.

We reproduce the same token sequence and the same split without searching for a template:

* boundary="joint" (default): tokenize `prompt + response` in one call, exactly as the reference does,
  and read the boundary from the fast tokenizer's character offsets. A token is a target when it
  ends after the prompt's last character, i.e. it holds at least one response character (a token
  that straddles the boundary is a target; trl would fail to find its template there and drop the
  whole sample). Special tokens the tokenizer adds (BOS) carry (0, 0) offsets and are never targets.
* boundary="separate": the prompt with the tokenizer's default special tokens (BOS), the response
  without, concatenated. Needs no offsets (slow tokenizers), but a SentencePiece tokenizer then
  prepends its word marker to a response that does not start with a space (":Sure" jointly, but
  "▁Sure" alone), a token sequence the joint text never has; prefer "joint". (Alpaca responses
  start with a space, so for them the two agree with current fast tokenizers.)

`add_eos=True` appends the tokenizer's EOS as a final target, so the model learns to stop; the
reference's texts carry no EOS (use `add_eos=False` to match it exactly). EOS is kept only when the
whole sample fits in `max_len`: a response cut short is not taught to end there.

Truncation keeps the first `max_len` tokens (prompt start kept, as the reference's right-side
truncation does); a sample whose response is cut away entirely has no targets and is dropped, with
one warning giving the count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

log = logging.getLogger(__name__)

Boundary = Literal["joint", "separate"]


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_len: int = 500,
    add_eos: bool = True,
    *,
    boundary: Boundary = "joint",
    return_kept: bool = False,
) -> tuple[list[list[int]], list[list[float]]] | tuple[list[list[int]], list[list[float]], list[int]]:
    """(sequences, loss_masks): token ids of prompt + response, and 1.0 on response tokens (targets).

    `tokenizer` is a Hugging Face tokenizer (fast for boundary="joint"). With `return_kept=True`
    also returns the input positions of the samples kept (those with at least one target).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, not {max_len}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass add_eos=False.")
    if not prompts:
        return ([], [], []) if return_kept else ([], [])

    if boundary == "joint":
        pairs = _encode_joint(tokenizer, prompts, responses)
    elif boundary == "separate":
        pairs = _encode_separate(tokenizer, prompts, responses)
    else:
        raise ValueError(f"boundary must be 'joint' or 'separate', not {boundary!r}.")

    sequences, masks, kept = [], [], []
    for i, (ids, mask) in enumerate(pairs):
        if add_eos:
            if ids and ids[-1] == eos and mask[-1] == 0.0:  # the tokenizer appended EOS itself
                mask[-1] = 1.0
            else:
                ids, mask = ids + [eos], mask + [1.0]
        ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask) > 0:
            sequences.append(ids)
            masks.append(mask)
            kept.append(i)
    dropped = len(prompts) - len(kept)
    if dropped:
        log.warning(
            "dropped %d of %d samples whose response lies entirely beyond max_len=%d tokens",
            dropped, len(prompts), max_len,
        )
    return (sequences, masks, kept) if return_kept else (sequences, masks)


def _encode_joint(tokenizer, prompts, responses) -> list[tuple[list[int], list[float]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "boundary='joint' needs a fast tokenizer (character offsets); load it with use_fast=True "
            "or pass boundary='separate'."
        )
    texts = [p + r for p, r in zip(prompts, responses)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        cut = len(prompt)
        out.append((list(ids), [1.0 if end > cut else 0.0 for _, end in offsets]))
    return out


def _encode_separate(tokenizer, prompts, responses) -> list[tuple[list[int], list[float]]]:
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [
        (list(p) + list(r), [0.0] * len(p) + [1.0] * len(r)) for p, r in zip(prompt_ids, response_ids)
    ]
