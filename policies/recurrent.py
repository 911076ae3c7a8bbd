"""The recurrent actor-critic of RL² (metarl/algorithms/rl2.py): sb3-contrib's ``MlpLstmPolicy``
with one faster, equivalent sequence pass.

RecurrentPPO cuts its batch into sequences that start at episode starts (its buffer's
``create_sequencers``), so within a minibatch an episode start can only be a sequence's first
step. sb3-contrib's ``_process_sequence`` nevertheless falls back to a Python loop over time
steps (one ``nn.LSTM`` call per step) whenever any ``episode_start`` in the minibatch is set,
which with RL²'s trials (every sequence starts a trial) is every minibatch: on 2D navigation
that loop was 90% of an iteration. :class:`TrialLstmPolicy` zeroes the initial state of the
sequences that start an episode and runs the whole minibatch through ``nn.LSTM`` in one call, the
same function (tested against the loop in tests/test_rl2.py); it keeps the loop for the case
of an episode start inside a sequence, which RecurrentPPO's buffer never produces.

Requires the ``baselines`` extra (sb3-contrib); import it only after
``metarl.extras.require("sb3_contrib", ...)``.
"""
from __future__ import annotations

import torch
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy


class TrialLstmPolicy(RecurrentActorCriticPolicy):
    """``MlpLstmPolicy`` (an MLP feature extractor is the identity here) with a one-call LSTM pass."""

    @staticmethod
    def _process_sequence(features, lstm_states, episode_starts, lstm):
        n_seq = lstm_states[0].shape[1]
        seq = features.reshape((n_seq, -1, lstm.input_size)).swapaxes(0, 1)      # [time, n_seq, in]
        starts = episode_starts.reshape((n_seq, -1)).swapaxes(0, 1)               # [time, n_seq]
        if bool(torch.any(starts[1:] != 0)):  # a reset inside a sequence: sb3-contrib's step loop
            return RecurrentActorCriticPolicy._process_sequence(features, lstm_states, episode_starts, lstm)
        keep = (1.0 - starts[0]).view(1, n_seq, 1)
        out, states = lstm(seq, (keep * lstm_states[0], keep * lstm_states[1]))
        return torch.flatten(out.transpose(0, 1), start_dim=0, end_dim=1), states
