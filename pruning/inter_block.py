"""Dynamic Inter-block Activation and Expansion-Corrosion (TinySR, paper section 3.1; docs/method.md, Depth pruning).

Blocks are paired (2j, 2j+1). Each pair has logits beta_j over three operators that move `delta` kept layers between
its two blocks while conserving the pair's total: T_-1 corrodes block 2j and expands block 2j+1, T_0 leaves both,
T_+1 expands 2j and corrodes 2j+1. A training step samples `u_j = gumbel_softmax(beta_j * scale, tau, hard=True)`.

Expansion-Corrosion: for block k with sampled pattern `cur_k`, `next_k` is a pattern sharing N - delta layers with
`cur_k`, chosen by one of two rules (`NEXT_RULES`, detached; ties broken at random while training, by the lowest index
at decision):

- `"pattern"` (the authors' code, `models/tinyfusion/tinysr_sd3.py`): the pattern with the highest gate logit among
  those neighbours of `cur_k`;
- `"marginal"` (the paper's text): the per-layer marginal keep probabilities of the block are sorted and taken in that
  order: `next_k` keeps the N - delta layers of `cur_k` with the highest marginals and adds the delta layers outside
  it with the highest marginals.

The two can disagree: for cur = (0, 1) and pattern probabilities (.25, .30, 0, .20, .25, 0) over (0,1), (0,2), (0,3),
(1,2), (1,3), (2,3), the pattern rule picks (0, 2), so corrosion keeps layer 0, while the marginal rule keeps layer 1
(marginal .70 > .55). The relaxed set operations of Eq. 8 are expansion `E = cur + next - cur * next` (union)
and corrosion `C = cur * next` (intersection), so that

    m_2j   = u0 * C_2j   + u1 * cur_2j   + u2 * E_2j
    m_2j+1 = u0 * E_2j+1 + u1 * cur_2j+1 + u2 * C_2j+1

keeps N - delta / N / N + delta layers per block and 2N per pair, with gradients reaching alpha (through `cur`) and
beta (through `u`). Decision: argmax beta per pair (a tie keeps T_0, so an undecided pair keeps its static pattern),
argmax alpha per block, the operator applied with the deterministic `next`. A trailing unpaired block (odd block
count) keeps its local pattern. With `num_samples`, every sample of a batch gets its own mask (TinyFusion's
per-sample sampling).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import NEXT_RULES
from .local_gates import LocalGates
from .search_space import SearchSpace


OPERATORS = ("T-1", "T0", "T+1")
KEEP_OPERATOR = OPERATORS.index("T0")


def expansion(current: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Relaxed union of two masks (Eq. 8): exact for 0/1 values, differentiable otherwise."""
    return current + candidate - current * candidate


def corrosion(current: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Relaxed intersection of two masks (Eq. 8)."""
    return current * candidate


def neighbour_table(patterns: torch.Tensor, delta: int) -> torch.Tensor:
    """(P, P) bool: `[p, q]` is True when pattern q differs from p and shares N - delta kept layers with it."""
    keep = int(patterns[0].sum().item())
    overlap = patterns @ patterns.T
    return (overlap == keep - delta) & ~torch.eye(len(patterns), dtype=torch.bool, device=patterns.device)


def _pick(scores: torch.Tensor, allowed: torch.Tensor, random_ties: bool) -> torch.Tensor:
    """Index of the highest `scores` among `allowed` along the last axis; ties at random or by the lowest index."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    ties = allowed & (masked == masked.max(dim=-1, keepdim=True).values)
    if random_ties:
        return torch.multinomial(ties.reshape(-1, ties.shape[-1]).float(), 1).reshape(ties.shape[:-1])
    return ties.float().argmax(dim=-1)  # the first maximum: the lowest index


def next_patterns(
    logits: torch.Tensor,
    current: torch.Tensor,
    neighbours: torch.Tensor,
    random_ties: bool,
    rule: str = "pattern",
    patterns: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """
    Index of `next_k` for every block (see the module docstring for the two rules).

    Args:
        logits: Gate logits per block, shape (num_blocks, P).
        current: Index of `cur_k`, shape (num_blocks,) or (num_samples, num_blocks).
        neighbours: [`neighbour_table`].
        random_ties: Break ties uniformly at random (training, global torch generator), else by the lowest index.
        rule: `"pattern"` (the authors' code) or `"marginal"` (the paper's text).
        patterns: The (P, M) pattern table and `scale` the logit scale: what the `"marginal"` rule needs for the
            marginal keep probabilities `softmax(logits * scale) @ patterns`.
    """
    logits = logits.detach()
    candidates = neighbours[current]
    if rule == "pattern":
        return _pick(logits.expand_as(candidates), candidates, random_ties)
    if rule != "marginal":
        raise ValueError(f"Unknown next rule {rule!r}; choose one of {NEXT_RULES}.")
    # Every neighbour shares N - delta layers with cur and adds delta others, chosen independently, so the one whose
    # layers' scores sum highest keeps the best N - delta of cur and adds the best delta outside it. The score of a
    # layer is the logit of its marginal keep probability, log m - log(1 - m), from log-sum-exps in float64: at
    # scale 100 the marginals themselves saturate to 1 (or vanish) in float32 and would tie.
    z = logits.double() * scale
    inside = patterns.T.bool()  # (M, P): layer l is kept by pattern p
    log_in = torch.logsumexp(z[:, None, :].masked_fill(~inside, float("-inf")), dim=-1)
    log_out = torch.logsumexp(z[:, None, :].masked_fill(inside, float("-inf")), dim=-1)
    layer_scores = (log_in - log_out).clamp(-1e30, 1e30)  # (num_blocks, M), monotone in the marginal
    return _pick((layer_scores @ patterns.T.double()).expand_as(candidates), candidates, random_ties)


def apply_operators(current: torch.Tensor, candidate: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """
    Combine per-block masks with the pair operators.

    Args:
        current: `cur`, shape (num_blocks, ..., M).
        candidate: `next`, same shape.
        operators: Operator weights (u0, u1, u2) per pair, shape (num_pairs, 3), or (num_pairs, ..., 3) with the
            middle axes of `current` (per-sample operators): one-hot or probabilities.

    Returns:
        The masks `m` per block, shape of `current`; a trailing unpaired block keeps `current`.
    """
    num_pairs = operators.shape[0]
    u = operators.movedim(-1, 1)  # (num_pairs, 3, ...)
    u = u.reshape(*u.shape, *([1] * (current.dim() - operators.dim() + 1))).to(current.dtype)
    corroded, expanded = corrosion(current, candidate), expansion(current, candidate)
    even, odd = slice(0, 2 * num_pairs, 2), slice(1, 2 * num_pairs, 2)
    mask_even = u[:, 0] * corroded[even] + u[:, 1] * current[even] + u[:, 2] * expanded[even]
    mask_odd = u[:, 0] * expanded[odd] + u[:, 1] * current[odd] + u[:, 2] * corroded[odd]
    paired = torch.stack((mask_even, mask_odd), dim=1).flatten(0, 1)
    return torch.cat((paired, current[2 * num_pairs :]), dim=0)


class InterBlockGates(nn.Module):
    r"""
    TinySR's gates: TinyFusion's local gates plus a pair gate over {T_-1, T_0, T_+1} for every pair of blocks.

    Parameters:
        space (`SearchSpace`): The block layout; `space.delta` layers move between the blocks of a pair.
        ema_decay (`float`, defaults to `0.999`): Decay of the moving average of all logits used for the decision.
        next_rule (`str`, defaults to `"pattern"`): How `next_k` is chosen, one of `NEXT_RULES`.
    """

    def __init__(self, space: SearchSpace, ema_decay: float = 0.999, next_rule: str = "pattern"):
        super().__init__()
        space.check_inter_block()
        if next_rule not in NEXT_RULES:
            raise ValueError(f"Unknown next rule {next_rule!r}; choose one of {NEXT_RULES}.")
        self.space = space
        self.next_rule = next_rule
        self.local = LocalGates(space, ema_decay)
        self.pair_logits = nn.Parameter(torch.zeros(space.num_pairs, len(OPERATORS)))
        self.register_buffer("ema_pair_logits", torch.zeros(space.num_pairs, len(OPERATORS)))
        self.register_buffer("neighbours", neighbour_table(self.local.patterns, space.delta), persistent=False)

    @property
    def patterns(self) -> torch.Tensor:
        return self.local.patterns

    def _next(self, logits: torch.Tensor, current: torch.Tensor, random_ties: bool, scale: float) -> torch.Tensor:
        return next_patterns(logits, current, self.neighbours, random_ties, self.next_rule, self.patterns, scale)

    def forward(self, tau: float, scale: float, num_samples: Optional[int] = None) -> torch.Tensor:
        """A sampled layer mask (num_layers,), or one per sample (num_samples, num_layers): 0/1 forward,
        straight-through gradients to alpha and beta."""
        chosen = self.local.sample_patterns(tau, scale, num_samples)  # ([S,] blocks, P)
        current = chosen @ self.patterns
        candidate = self.patterns[self._next(self.local.logits, chosen.argmax(-1), True, scale)]
        pair_logits = self.pair_logits * scale
        if num_samples is not None:
            pair_logits = pair_logits.expand(num_samples, -1, -1)
            current, candidate = current.transpose(0, 1), candidate.transpose(0, 1)  # (blocks, S, M)
        operators = F.gumbel_softmax(pair_logits, tau=tau, hard=True, dim=-1)
        if num_samples is None:
            return apply_operators(current, candidate, operators).reshape(-1)
        masks = apply_operators(current, candidate, operators.transpose(0, 1))  # (blocks, S, M)
        return masks.transpose(0, 1).reshape(num_samples, -1)

    def _pair_logits(self, ema: bool) -> torch.Tensor:
        return (self.ema_pair_logits if ema else self.pair_logits).detach()

    def operators(self, ema: bool = True) -> torch.Tensor:
        """Decided operator index per pair (0: T_-1, 1: T_0, 2: T_+1); a tie that involves T_0 keeps T_0 (an
        undecided pair keeps its static pattern), a tie between T_-1 and T_+1 alone takes T_-1."""
        logits = self._pair_logits(ema)
        best = logits.argmax(dim=-1)
        keeps = logits[:, KEEP_OPERATOR] == logits.max(dim=-1).values
        return torch.where(keeps, torch.full_like(best, KEEP_OPERATOR), best)

    def operator_probabilities(self, scale: float, ema: bool = True) -> torch.Tensor:
        return torch.softmax(self._pair_logits(ema).float() * scale, dim=-1)

    def decide(self, ema: bool = True, scale: float = 100.0) -> torch.Tensor:
        """The final hard layer mask (num_layers,), deterministic (`scale`: the logit scale of the marginal rule's
        keep probabilities; TinyFusion's 100)."""
        choices = self.local.choices(ema)
        candidate = self._next(self.local.gate_logits(ema), choices, False, scale)
        operators = F.one_hot(self.operators(ema), len(OPERATORS))
        return apply_operators(self.patterns[choices], self.patterns[candidate], operators).reshape(-1)

    def keep_probabilities(self, scale: float, ema: bool = True) -> torch.Tensor:
        """
        Exact marginal probability that each layer is kept (num_layers,), with `next` taken deterministically.

        Patterns and operators are independent across blocks and pairs, so the marginal of block k is the average over
        its patterns p (weights softmax(alpha_k * scale)) of the operator-averaged mask of (p, next(p)).
        """
        logits = self.local.gate_logits(ema)
        num_blocks, num_patterns = logits.shape
        every = torch.arange(num_patterns, device=logits.device).expand(num_blocks, -1)
        candidate = torch.stack([self._next(logits, every[:, p], False, scale) for p in range(num_patterns)], 1)
        current = self.patterns.expand(num_blocks, -1, -1)
        expected = apply_operators(current, self.patterns[candidate], self.operator_probabilities(scale, ema))
        return torch.einsum("kp,kpm->km", self.local.probabilities(scale, ema), expected).reshape(-1)

    @torch.no_grad()
    def update_ema(self) -> None:
        self.local.update_ema()
        self.ema_pair_logits.lerp_(
            self.pair_logits.detach().to(self.ema_pair_logits.dtype), 1.0 - self.local.ema_decay
        )

    def decision_details(self, scale: float, ema: bool = True) -> dict:
        """JSON-ready record: local patterns and confidences, plus the operator and its probability per pair."""
        details = self.local.decision_details(scale, ema)
        details.update(
            delta=self.space.delta,
            operators=[OPERATORS[i] for i in self.operators(ema).tolist()],
            operator_confidence=self.operator_probabilities(scale, ema).max(dim=-1).values.tolist(),
        )
        return details
