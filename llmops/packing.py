"""Training examples and micro-batches: chat-template encoding, token-budget batching, padding-free packing.

Rows are encoded with the base model's chat template (loss on assistant tokens + end-of-turn only), then grouped
into micro-batches of at most `tokens_per_batch` tokens; each micro-batch is one Trainer "sample" (batch size 1).
Padded (the CPU default): rows of about one length per micro-batch, right-padded, with an attention mask. Packed:
one flat row with position ids restarting per example (padding-free, as transformers' DataCollatorWithFlattening);
attention never crosses examples, which pays off with a varlen attention kernel (flash-attention on a GPU).
"""

from __future__ import annotations

import random

from llmops import chat
from llmops.stage import StageError


def encode_rows(rows: list[dict], tokenizer, eot_id: int, max_len: int) -> list[dict]:
    """Chat-template encode; loss only on assistant replies (+ their end-of-turn token)."""
    out = []
    for r in rows:
        try:
            enc = chat.encode(tokenizer, r["messages"], eot_id, max_len)
        except chat.ChatFormatError as e:
            raise StageError(f"row {r.get('id')} ({r.get('source')}): {e}; rerun preprocess/synthetic") from None
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return out


def make_batches(examples: list[dict], tokens_per_batch: int, packing: bool, seed: int | str | None) -> list[dict]:
    """Group examples into micro-batches under a token budget; `seed` shuffles (None keeps a fixed order).

    Packed: examples in shuffled order, the sum of lengths ≤ budget. Padded: examples sorted by length, so each
    micro-batch holds rows of about one length ((rows × longest) ≤ budget: ~1% padding on the default data), then
    the batches are shuffled. On CPU and with SDPA the padded, length-grouped batches train ~1.4x faster: attention
    over a packed row costs (Σ lengths)², over a padded batch Σ length² (measured 321 vs 230 real tokens/s).
    """
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    if not packing:  # stable sort: equal lengths keep the shuffled order
        order.sort(key=lambda i: len(examples[i]["input_ids"]))
    batches: list[list[int]] = []
    cur: list[int] = []
    used = longest = 0
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > tokens_per_batch:
            raise StageError(f"an example has {n} tokens > train.tokens_per_batch={tokens_per_batch}")
        cost = used + n if packing else (len(cur) + 1) * max(longest, n)
        if cur and cost > tokens_per_batch:
            batches.append(cur)
            cur, used, longest = [], 0, 0
        cur.append(i)
        used, longest = used + n, max(longest, n)
    if cur:
        batches.append(cur)
    if not packing and seed is not None:
        random.Random(f"{seed}:batches").shuffle(batches)
    return [{"examples": [examples[i] for i in b]} for b in batches]


def mix_batches(
    seed_ex: list[dict], synthetic_ex: list[dict], repeats: int, tokens_per_batch: int, packing: bool, seed: int
) -> list[dict]:
    """One epoch's micro-batches with the synthetic rows seen `repeats` times (train.synthetic_repeats) and the seed
    rows once: `repeats` rounds, each every synthetic row plus every `repeats`-th seed row, batched on their own, so a
    row never meets its copy in one micro-batch (the Trainer shuffles the batches of all rounds together). One
    round is `make_batches` over all rows; zero rounds train on the seed rows alone."""
    if repeats == 0:
        return make_batches(seed_ex, tokens_per_batch, packing, seed)
    return [b for r in range(repeats) for b in make_batches(seed_ex[r::repeats] + synthetic_ex, tokens_per_batch,
                                                              packing, seed if r == 0 else f"{seed}:{r}")]  # fmt: skip


def logit_positions(labels):
    """The positions whose next token is labelled in some row of the batch: the only logits the loss reads.

    The collator hands them to the model as `logits_to_keep`, so the 49k-vocabulary head and its cross-entropy run
    on ~69 % of a default batch's positions instead of all (prompts and padding predict nothing we train on): the
    same loss and gradients, 1.056x the real tokens/s on the AVX2 box (BENCHMARKS.md "Train")."""
    return (labels[:, 1:] != chat.IGNORE_INDEX).any(0).nonzero().squeeze(1)


class Collator:
    """Packed: one flat row + per-example position ids, no attention mask (so transformers builds a
    block-diagonal causal mask from the position ids). Padded: right-padded rows + attention mask. Both carry
    `logits_to_keep` (`logit_positions`)."""

    def __init__(self, packing: bool, pad_id: int):
        from transformers import DataCollatorWithFlattening

        self.packing, self.pad_id = packing, pad_id
        self.flatten = DataCollatorWithFlattening(return_position_ids=True)

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        feats = [ex for item in batch for ex in item["examples"]]
        if self.packing:
            out = self.flatten(feats)
            return {**out, "logits_to_keep": logit_positions(out["labels"])}
        width = max(len(f["input_ids"]) for f in feats)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in feats])

        mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in feats])
        labels = pad("labels", chat.IGNORE_INDEX)
        return {"input_ids": pad("input_ids", self.pad_id), "labels": labels, "attention_mask": mask,
                "logits_to_keep": logit_positions(labels)}  # fmt: skip


def token_weighted_loss(eval_batches: list[dict]):
    """The Trainer's `compute_loss_func`: causal-LM cross-entropy on the labelled tokens, token-weighted in eval too.

    Training steps divide by `num_items_in_batch`, the labelled tokens of the whole optimizer step. The eval loop
    averages per-batch means, which over micro-batches of unequal token counts is not the val loss (10.8230 vs
    10.8260 on the tiny model's two val batches). Dividing each eval batch's summed NLL by the mean labelled tokens
    per batch makes the loop's plain average the token-weighted mean that merge and evaluate report. An eval forward
    is the one whose logits need no gradient. Logits come only at `logit_positions(labels)` when the collator asked
    for them (the targets are then the labels one position on); a full-length forward is scored as usual.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    tokens = sum(
        sum(1 for t in ex["labels"][1:] if t != chat.IGNORE_INDEX) for b in eval_batches for ex in b["examples"]
    )
    per_batch = tokens / max(1, len(eval_batches))

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        n = num_items_in_batch if logits.requires_grad else per_batch
        if logits.shape[-2] == labels.shape[-1]:
            return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=n)
        targets = labels[:, logit_positions(labels) + 1]
        return ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch=n, shift_labels=targets)

    return loss
