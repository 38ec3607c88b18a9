"""Text generation: greedy, temperature, top-k, top-p, repetition penalty, stop strings.

Generation is batched (several samples of one prompt at once) and streams: `stream`
yields the new characters of every sample at each step. A key/value cache makes each
step cost one position; when the context is full, the window slides: the cache is rebuilt
from the last half-context of characters, so `max_new_tokens` may exceed the context.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from fundamentallm.config import SampleConfig
from fundamentallm.data.vocab import UNK_ID, Vocab
from fundamentallm.model import CharTransformer
from fundamentallm.runtime import Precision

log = logging.getLogger(__name__)

__all__ = ["SampleConfig", "Sampler", "apply_repetition_penalty", "filter_logits"]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit (B, V) outside the top-k and outside the top-p nucleus."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on logits (B, V) of every id present in `history` (B, T)."""
    if penalty == 1.0:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, history, True)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class Sampler:
    """Generates text from a model and its vocabulary."""

    def __init__(
        self,
        model: CharTransformer,
        vocab: Vocab,
        device: torch.device | str = "cpu",
        precision: Precision | None = None,
        *,
        use_cache: bool = True,
    ):
        self.model = model.eval()
        self.vocab = vocab
        self.device = torch.device(device)
        self.precision = precision or Precision("fp32", None)
        self.use_cache = use_cache
        self.context = model.config.context_length

    def encode_prompt(self, prompt: str, unknown: str) -> list[int]:
        if not prompt:
            # Start from a newline, the most neutral character a text corpus has.
            return [int(self.vocab.encode("\n", unknown="unk")[0])]
        if unknown == "error":
            return self.vocab.encode(prompt, unknown="error").tolist()
        ids = self.vocab.encode(prompt, unknown="unk").tolist()
        missing = sorted({c for c, i in zip(prompt, ids, strict=True) if i == UNK_ID})
        if missing:
            log.warning("prompt characters not in the vocabulary, used as unknown: %s", ", ".join(map(repr, missing)))
        return ids

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor, caches: list | None) -> torch.Tensor:
        with self.precision.autocast(self.device):
            logits, _ = self.model(ids, caches=caches)
        return logits[:, -1, :].float()  # (B, V)

    @torch.no_grad()
    def next_distribution(self, text: str, k: int = 10) -> list[tuple[str, float]]:
        """The model's `k` most likely next characters after `text` (its last context-length
        characters), with their probabilities: the raw distribution, before temperature and the
        other sampling settings reshape it. The unknown id is listed as '(unknown)'."""
        ids = self.encode_prompt(text, "unk")[-self.context :]
        logits = self._logits(torch.tensor([ids], dtype=torch.long, device=self.device), None)
        probs, top = logits.softmax(dim=-1)[0].topk(min(k, logits.size(-1)))
        return [
            ("(unknown)" if i == UNK_ID else self.vocab.decode([i]), float(p))
            for i, p in zip(top.tolist(), probs.tolist(), strict=True)
        ]

    @torch.no_grad()
    def stream(self, prompt: str, config: SampleConfig) -> Iterator[list[str]]:
        """Yield, at each step, the new text of every sample ('' where there is none).

        A sample ends as soon as one of the stop strings has been generated; where several end
        on the same character, the text is cut where the earliest of them starts. Text that
        could be the start of a stop string is held back until it is clear that it is not, so
        a consumer never prints part of a stop string.
        """
        prompt_ids = self.encode_prompt(prompt, config.unknown)
        B = config.num_samples
        history = torch.tensor([prompt_ids] * B, dtype=torch.long, device=self.device)  # (B, T_all)
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        texts = [""] * B
        emitted = [0] * B
        done = [False] * B
        keep = max(1, self.context // 2)
        caches = None
        pending = history[:, -self.context :]  # positions not yet in the cache
        for _ in range(config.max_new_tokens):
            if not self.use_cache:
                logits = self._logits(history[:, -self.context :], None)
            else:
                if caches is not None and caches[0].k.shape[2] + pending.shape[1] > self.context:
                    caches, pending = None, history[:, -keep:]  # the window slides: rebuild from recent text
                if caches is None:
                    caches = self.model.new_caches()
                logits = self._logits(pending, caches)
            logits = apply_repetition_penalty(logits, history, config.repetition_penalty)
            if config.temperature == 0:
                next_ids = logits.argmax(dim=-1)
            else:
                logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
                probs = logits.softmax(dim=-1).cpu()
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(self.device)
            history = torch.cat((history, next_ids[:, None]), dim=1)
            pending = next_ids[:, None]
            new_chars = self.vocab.decode(next_ids.cpu().numpy())
            out = [""] * B
            for b in range(B):
                if done[b]:
                    continue
                texts[b] += new_chars[b]
                end = len(texts[b]) - _held_back(texts[b], config.stop)
                # A stop string can only have just ended here (earlier ones ended the sample); of those
                # ending on this character, the one starting first wins, whatever its place in the list.
                starts = [len(texts[b]) - len(stop) for stop in config.stop if texts[b].endswith(stop)]
                if starts:
                    end = min(starts)
                    texts[b], done[b] = texts[b][:end], True
                out[b] = texts[b][emitted[b] : end]
                emitted[b] = end
            yield out
            if all(done):
                return
        tail = [texts[b][emitted[b] :] for b in range(B)]
        if any(tail):
            yield tail

    def generate(self, prompt: str, config: SampleConfig) -> list[str]:
        """The generated continuations (prompt excluded), one per sample."""
        texts = [""] * config.num_samples
        for pieces in self.stream(prompt, config):
            for b, piece in enumerate(pieces):
                texts[b] += piece
        return texts


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
