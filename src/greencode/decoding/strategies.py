"""Row strategies: what one row of a :class:`~greencode.decoding.generate.DecodeBatch` does
differently from a plain early-exit row, as an object the row carries.

:meth:`DecodeBatch.step <greencode.decoding.generate.DecodeBatch.step>` does what every row does:
embed its last token, run the layers, ask the controllers, propagate the K/V of the rows that
exit, choose each row's token from the logits where it exited. A strategy adds to that through a
few named hooks and owns the fields it fills (the plain row carries none):

* :meth:`RowStrategy.prepare` when the row joins the batch (check its settings, adjust its length);
* :meth:`RowStrategy.chosen` after the row's token is chosen: the token it is fed next;
* :meth:`RowStrategy.ready` how many of its tokens may be handed on (a draft waits for verification);
* :meth:`RowStrategy.at_exit_point` at each early exit point the layers reach, once for all the rows
  carrying strategies of one kind (what is read there before any decision: a kept state, the oracle's
  prediction);
* :meth:`RowStrategy.at_top` for a row that ran to the final layer, once its logits are known (the
  oracle moves its recorded exit to the first exit point that agreed);
* :meth:`RowStrategy.after_step` once per step for all the rows carrying strategies of one kind
  (batched work over those rows, e.g. one LM head over their observed states);
* :meth:`RowStrategy.finish` when the row's result is made (the strategy's fields into it).

And what the step must do for the row, as declared flags: ``carries_exited`` (the row's exits do
not take rows out of the layer loop: a shadow climb), ``reads_states`` (the step keeps the states
at every exit point and the final layer), ``reads_every_exit_point`` (a compiled segment ends at
every exit point). Strategies compose: a row may carry several (a teacher-forced row observed for
the trajectory bank). Each strategy instance holds one row's state: give every row its own.

* :class:`TeacherForced`: fed given tokens instead of its own choices, recording what it chose;
* :class:`Observed`: every exit point's state and greedy prediction for each decided token (the
  RL trajectory bank's data; ``DecodeBatch(observe=True)`` gives every row one).

* :class:`KeptStates`: the fed token's state at every exit point it runs through, per step (what lossless
  verification reuses; ``Row(keep_states=True)`` for short);
* :class:`OracleExits`: every exit point's greedy prediction, and the exit recorded at the first one that
  agrees with the final layer (the oracle controller's rows get one: it runs every layer and decides after);

* :class:`~greencode.decoding.speculative.Lossless`: drafts with early exits and is verified by the
  full model within the step (``Row(lossless=True)`` for short).
"""

from __future__ import annotations

from typing import Sequence

import torch


class RowStrategy:
    """The hooks a row strategy may fill (each a no-op here) and the flags it declares."""

    carries_exited = False  # the batch keeps every row in the layer loop after it exits (exact K/V overwritten after)
    reads_states = False  # the step keeps the states at every exit point and the final layer (``_Step.seen_h``)
    reads_every_exit_point = False  # a compiled segment must end at every exit point for this row

    def prepare(self, row, batch) -> None:
        """The row joins ``batch`` (before its prefill)."""

    def chosen(self, row, token: int) -> int:
        """The row chose ``token`` (not yet appended to ``row.tokens``); returns the token it takes."""
        return token

    def ready(self, row, n: int) -> int:
        """Of the row's first ``n`` tokens, how many may be handed on (streamed, tested for an end) now."""
        return n

    @classmethod
    def at_exit_point(cls, batch, st, layer: int, members: list) -> None:
        """The layers reached early exit point ``layer`` (0-based), before any row decides there: ``st.h``
        holds the running rows' states (row ``r`` at ``st.where[r]``); ``members`` as in :meth:`after_step`."""

    def at_top(self, row, st, r: int) -> None:
        """Row ``r`` ran to the final layer: its logits are ``st.row_logits[r]``, its exit ``st.exit_at[r]``."""

    @classmethod
    def after_step(cls, batch, st, members: list) -> None:
        """After every row's token is chosen in a step: ``members`` are ``(row index in st.rows,
        strategy)`` for the step's rows carrying a strategy of this kind."""

    def finish(self, row, result) -> None:
        """The row's :class:`~greencode.decoding.generate.GenerationResult` is made: fill in this strategy's fields."""


class TeacherForced(RowStrategy):
    """Feed ``tokens`` (e.g. the full model's continuation) instead of the row's own choices; the
    row stops at their end. ``own_tokens``: what the row chose at each position (token consistency:
    one wrong exit changes one position, not all after it). Greedy only."""

    def __init__(self, tokens: Sequence[int]):
        self.forced = [int(t) for t in tokens]
        self.own_tokens: list[int] = []
        if not self.forced:
            raise ValueError("forced_tokens has an empty list; each row needs at least one token to be fed")

    def prepare(self, row, batch) -> None:
        if row.do_sample:
            raise ValueError("forced_tokens is for greedy decoding (teacher-forced consistency); set do_sample=False")
        row.max_new_tokens = min(row.max_new_tokens, len(self.forced))

    def chosen(self, row, token: int) -> int:
        self.own_tokens.append(token)
        return self.forced[len(row.tokens)]

    def finish(self, row, result) -> None:
        result.own_tokens = self.own_tokens


class Observed(RowStrategy):
    """Record, for every decided token, the hidden state at every early exit point (``states``,
    ``[E, H]`` each) and every exit point's greedy prediction (``preds``, ``[E + 1]``, the last the
    final layer's). A row that exits keeps climbing in the shadow (``carries_exited``): its deeper
    states are the ones it would have reached, while its tokens, exits and cache stay those of the
    unobserved run (the shadow layers' K/V are overwritten by the propagated ones)."""

    carries_exited = True
    reads_states = True
    reads_every_exit_point = True

    def __init__(self):
        self.states: list = []
        self.preds: list = []

    @classmethod
    def after_step(cls, batch, st, members: list) -> None:
        stacked = torch.stack(st.seen_h, dim=1)[:, :, -1]  # [R, E + 1, H]
        idx = [r for r, _ in members]
        if idx != list(range(stacked.shape[0])):
            stacked = stacked[idx]
        preds = batch.model.decode(stacked).argmax(-1)  # [len(members), E + 1]
        for k, (_, s) in enumerate(members):
            s.states.append(stacked[k, :-1].float().cpu())
            s.preds.append(preds[k].cpu())

    def finish(self, row, result) -> None:
        result.exit_states, result.exit_preds = self.states, self.preds


class KeptStates(RowStrategy):
    """Keep, for every step, the fed token's state at each early exit point it ran through before it exited
    (``row.kept_states``: one ``{0-based layer: state [H]}`` per decided token), the lower layers a lossless
    row's verification reuses instead of recomputing them."""

    reads_every_exit_point = True

    def prepare(self, row, batch) -> None:
        row.keep_states = True
        row.kept_states = []

    @classmethod
    def at_exit_point(cls, batch, st, layer: int, members: list) -> None:
        first = layer == batch.exit_points[0]
        for r, _ in members:
            row = st.rows[r]
            if first:  # every row runs from layer 0 each step: the first exit point opens the step's record
                row.kept_states.append({})
            if r in st.active:
                row.kept_states[-1][layer] = st.h[st.where[r], -1].clone()

    def finish(self, row, result) -> None:
        result.kept_states = row.kept_states


class OracleExits(RowStrategy):
    """The oracle's row: it runs every layer (its controller never exits) while the greedy prediction at each
    exit point is read, one LM head for all such rows at once; the exit recorded for its token is the first
    exit point whose prediction equals the final layer's (l_opt), the final layer when none does. Its tokens
    are the full model's; its counters count every head it ran."""

    reads_every_exit_point = True

    def __init__(self):
        self.preds: list[tuple[int, int]] = []  # this step's (exit layer, greedy prediction there)

    @classmethod
    def at_exit_point(cls, batch, st, layer: int, members: list) -> None:
        if layer == batch.exit_points[0]:
            for _, s in members:
                s.preds = []
        pos = [st.where[r] for r, _ in members]
        preds = batch.model.decode(st.h[pos]).argmax(-1)[:, -1]
        for (r, s), p in zip(members, preds.tolist()):
            s.preds.append((layer, int(p)))
            st.counters[r]["lm_head_calls"] += 1

    def at_top(self, row, st, r: int) -> None:
        final_pred = int(torch.argmax(st.row_logits[r][0, -1]))
        st.exit_at[r] = next((layer for layer, p in self.preds if p == final_pred), st.exit_at[r])
