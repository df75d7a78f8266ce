"""Running a model on task prompts: greedy continuations, full-cache task accuracy and perplexity.

Imports only kvp_gym.tasks (and torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from kvp_gym.tasks import Task, encode, make_sample


def sample_seed(seed: int, index: int) -> int:
    """The task seed of sample ``index`` of a run with ``seed``: distinct and stable across runs and shards."""
    return seed * 1_000_003 + index


@torch.inference_mode()
def greedy(model: PreTrainedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids`` (at most ``max_new_tokens`` tokens, stopping after an end-of-turn token)."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id,
    )
    prompt = torch.tensor([ids])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def perplexity(model: PreTrainedModel, prompt_ids: list[int], continuation_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ``continuation_ids`` given ``prompt_ids``."""
    ids = torch.tensor([prompt_ids + continuation_ids])
    # Only the logits that predict the continuation: all of them would be [S, vocab] (17 GB for Gemma 3 at 16k).
    logits = model(ids, use_cache=False, logits_to_keep=len(continuation_ids) + 1).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(continuation_ids))
    return math.exp(nll.item())


@dataclass
class TaskAccuracy:
    """Full-cache results of one task at one context length.

    score: mean exact-match score in [0, 1] (tasks with answers); perplexity: of the real continuation (free
    text). prompt_tokens: mean prompt length.
    """

    task: str
    context: int
    samples: int
    prompt_tokens: float
    score: float | None = None
    perplexity: float | None = None
    outputs: list[str] = field(default_factory=list)


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    context: int,
    samples: int,
    seed: int = 0,
    perplexity_tokens: int = 64,
    progress: bool = True,
) -> TaskAccuracy:
    """Run ``task`` with the full cache on ``samples`` prompts of about ``context`` tokens."""
    scores, perplexities, lengths, outputs = [], [], [], []
    for index in tqdm(range(samples), desc=f"{task.name}@{context}", disable=not progress, leave=False):
        sample = make_sample(task, tokenizer, context, sample_seed(seed, index))
        encoded = encode(tokenizer, sample)
        lengths.append(len(encoded.ids))
        if task.has_answers:
            output = tokenizer.decode(greedy(model, encoded.ids, task.answer_tokens), skip_special_tokens=True)
            outputs.append(output)
            scores.append(task.score(output, sample.answers))
        else:
            perplexities.append(perplexity(model, encoded.ids, encoded.continuation_ids[:perplexity_tokens]))
    return TaskAccuracy(
        task=task.name,
        context=context,
        samples=samples,
        prompt_tokens=sum(lengths) / samples,
        score=sum(scores) / samples if scores else None,
        perplexity=math.exp(sum(map(math.log, perplexities)) / samples) if perplexities else None,
        outputs=outputs,
    )
