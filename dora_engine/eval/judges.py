"""Pairwise judges for ``eval winrate``: does the policy's response beat the golden one?

A judge maps comparisons (prompt, policy response, golden response) to verdicts from the policy's
point of view: ``win``, ``lose``, ``tie`` or ``error`` (the judge gave no usable answer; the types are in
``dora_engine.eval.comparison``). Specs:

- ``oracle``: the synthetic data's ``oracle_reward(prompt, response)`` (``dora_engine.data.synth``);
- ``reward-model:PATH``: a sequence-classification model with a single logit as the reward;
- ``openai:MODEL``: an OpenAI-compatible chat endpoint (``dora_engine.eval.http_judge``).

Reward judges compare the two rewards: a difference within ``tie_tolerance`` is a tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from dora_engine.device import resolve_device
from dora_engine.errors import UserValueError
from dora_engine.eval.comparison import Comparison, Judge, Verdict
from dora_engine.eval.http_judge import ChatJudge, ChatOptions
from dora_engine.hf_loading import load_pretrained


class RewardScorer(Protocol):
    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class OracleScorer:
    """The synthetic mixture's known reward (``dora_engine.data.synth.oracle_reward``)."""

    name = "oracle"

    def __init__(self) -> None:
        try:
            from dora_engine.data.synth import oracle_reward
        except ImportError as err:
            raise RuntimeError(f"the oracle judge needs dora_engine.data.synth.oracle_reward ({err})") from None
        self._reward = oracle_reward

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self._reward(p, r)) for p, r in zip(prompts, responses, strict=True)]


class RewardModelScorer:
    """r(x, y) = the single logit of a sequence-classification reward model on the chat (or "x\\n\\ny")."""

    def __init__(
        self, path: str, *, batch_size: int = 8, max_length: int = 1024, device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"reward-model:{path}"
        self.device = resolve_device(device)
        self.tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
        self.model = load_pretrained(AutoModelForSequenceClassification, path, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise UserValueError(
                f"reward model {path} has {self.model.config.num_labels} outputs; a reward model needs exactly 1"
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    def _text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return f"{prompt}\n\n{response}"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch
        from tqdm.auto import tqdm

        texts = [self._text(p, r) for p, r in zip(prompts, responses, strict=True)]
        rewards: list[float] = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="reward model", unit="batch"):
            enc = self.tokenizer(
                texts[start:start + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            with torch.no_grad():
                rewards.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return rewards


class RewardJudge:
    """Verdicts from the reward difference r(policy) − r(golden); |difference| ≤ tie_tolerance is a tie."""

    def __init__(self, scorer: RewardScorer, tie_tolerance: float = 0.0) -> None:
        if tie_tolerance < 0:
            raise UserValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
        self.scorer = scorer
        self.name = scorer.name
        self.tie_tolerance = tie_tolerance

    def rewards(self, comparisons: Sequence[Comparison]) -> tuple[list[float], list[float]]:
        """The rewards of the policy responses and of the golden ones."""
        prompts = [c.instruction for c in comparisons]
        policy = self.scorer.score(prompts, [c.policy for c in comparisons])
        golden = self.scorer.score(prompts, [c.golden for c in comparisons])
        return [float(r) for r in policy], [float(r) for r in golden]

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        policy, golden = self.rewards(comparisons)
        return [self.verdict(p - g) for p, g in zip(policy, golden, strict=True)]

    def verdict(self, margin: float) -> Verdict:
        """The verdict of a reward difference r(policy) − r(golden)."""
        if margin > self.tie_tolerance:
            return "win"
        if margin < -self.tie_tolerance:
            return "lose"
        return "tie"


def make_reward_scorer(
    spec: str, *, batch_size: int = 8, max_length: int = 1024, device: str | None = None,
    trust_remote_code: bool = False,
) -> RewardScorer:
    """``oracle`` or ``reward-model:PATH`` (the model read in batches of ``batch_size`` on ``device``;
    ``trust_remote_code``: ``dora_engine.hf_loading``)."""
    if spec == "oracle":
        return OracleScorer()
    if spec.startswith("reward-model:") and spec.split(":", 1)[1]:
        return RewardModelScorer(spec.split(":", 1)[1], batch_size=batch_size, max_length=max_length, device=device,
                                 trust_remote_code=trust_remote_code)
    raise UserValueError(f"unknown reward {spec!r}; use 'oracle' or 'reward-model:PATH'")


def make_judge(
    spec: str, *, tie_tolerance: float = 0.0, batch_size: int = 8, device: str | None = None,
    chat: ChatOptions | None = None, trust_remote_code: bool = False,
) -> Judge:
    """A judge from its spec: ``oracle``, ``reward-model:PATH`` (rewards within ``tie_tolerance`` tie; the
    model read in batches of ``batch_size`` on ``device``) or ``openai:MODEL`` (asked as ``chat`` says)."""
    if spec.startswith("openai:") and spec.split(":", 1)[1]:
        return ChatJudge(spec.split(":", 1)[1], chat or ChatOptions())
    if spec == "oracle" or spec.startswith("reward-model:"):
        scorer = make_reward_scorer(spec, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
        return RewardJudge(scorer, tie_tolerance=tie_tolerance)
    raise UserValueError(f"unknown judge {spec!r}; use 'oracle', 'reward-model:PATH' or 'openai:MODEL'")
