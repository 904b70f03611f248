"""Privacy end to end (issue 6): what a real EdgeClient releases over a real Mosquitto, and what its ledger says.

One device with a budget for exactly k = 3 releases at z is offered k + 2 rounds, restarted (new process
state: a new EdgeClient on the same state_dir) between every round. Proven:
* exactly k updates arrive over MQTT, one per round, and rounds k+1, k+2 are skipped with reason "budget";
* the ledger's ε equals dp-accounting's PLD accountant for the multipliers actually released (rel. 1e-3);
* the noise in the k released updates has std zC: the released coordinates are clipped signal (‖·‖ ≤ C per
  update) plus N(0, σ²), σ = zC, so their mean square over n coordinates lies, except with probability 1e-6, in
  [σ²·χ²_n(5e-7)/n, σ²·χ²_n(1 − 5e-7)/n + k·C²/n]; their excess kurtosis is within 6 standard errors of 0.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from edge_sdk import wire
from edge_sdk.client import EdgeClient
from edge_sdk.privacy import epsilon_for, max_releases
from tests.test_client_mqtt import FLEET, TOPICS, Subscriber, announce, bundle, config, data, wait_for  # noqa: F401

pytestmark = pytest.mark.mosquitto


def test_budget_for_k_releases_across_restarts_exact_epsilon_and_noise_std(mosquitto, bundle, data, tmp_path):
    dp = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant
    from scipy.stats import chi2

    k, z, clip, delta = 3, 8.0, 0.25, 1e-5
    budget = (epsilon_for([z] * k, delta) + epsilon_for([z] * (k + 1), delta)) / 2
    assert max_releases(z, budget, delta) == k
    sub = Subscriber(mosquitto.port, TOPICS.all_updates, client_id="privacy-observer")
    state = tmp_path / "dev1"
    outcomes = []
    try:
        for rnd in range(1, k + 3):
            results = []
            client = EdgeClient(config(mosquitto, state, epsilon_budget=budget, delta=delta), bundle, data,
                                on_round_result=results.append)
            try:
                announce(mosquitto, bundle, round_=rnd, model_round=rnd - 1, z=z, clip=clip)
                client.start()
                wait_for(lambda: results, 20, f"round {rnd} result")
                time.sleep(0.2)
                outcomes.append((rnd, results[0].status, results[0].reason))
                eps = client.ledger.epsilon
                n_releases = len(client.ledger.releases)
            finally:
                client.stop()
        time.sleep(0.5)
    finally:
        sub.close()
    assert outcomes == [(r, "published", "") for r in range(1, k + 1)] + [(k + 1, "skipped", "budget"),
                                                                         (k + 2, "skipped", "budget")]
    updates = sub.updates()
    assert len(updates) == k and sorted(u.round for u in updates) == list(range(1, k + 1))
    assert n_releases == k and eps <= budget
    # ε equals dp-accounting's PLD accountant for the k releases at z (add/remove adjacency).
    acc = PLDAccountant(dp.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-4)
    acc.compose(dp.ComposedDpEvent([dp.GaussianDpEvent(u.noise_multiplier) for u in updates]))
    ref = acc.get_epsilon(delta)
    assert eps == pytest.approx(ref, rel=1e-3), (eps, ref)
    # The released noise has std zC.
    values = np.concatenate([np.concatenate([t.ravel() for t in u.tensors.values()]) for u in updates]).astype(np.float64)
    n, sigma = values.size, z * clip
    s2 = float(np.dot(values, values)) / n  # mean square: noise variance + (clipped signal)² / n per update
    lo = sigma ** 2 * chi2.ppf(5e-7, n) / n
    hi = sigma ** 2 * chi2.ppf(1 - 5e-7, n) / n + k * clip ** 2 / n
    print(f"\nreleased noise: n={n} coordinates over {k} updates, sqrt(mean square) {math.sqrt(s2):.4f} vs zC {sigma:.4f} "
          f"(accepted range [{math.sqrt(lo):.4f}, {math.sqrt(hi):.4f}]); ε ledger {eps:.5f} vs PLD {ref:.5f}")
    assert lo <= s2 <= hi
    # And it looks Gaussian: excess kurtosis ~ 0 (standard error sqrt(24/n)).
    kurt = float(np.mean(values ** 4) / s2 ** 2 - 3)
    assert abs(kurt) < 6 * math.sqrt(24 / n), kurt
