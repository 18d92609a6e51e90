"""What every registered method promises, checked on tiny random models through the engine.

* With a budget at least the prompt, it keeps everything and decodes exactly as the full cache
  (WindowKV: a budget whose smallest group budget is at least the prompt, since its groups'
  budgets decay from 2C - C*S/beta to C*S/beta, as in the reference).
* With a small budget, every layer keeps at most what ``--capacity`` allows for the method
  (see the README's table of what capacity counts), and the cache really shrinks.
* It is deterministic: the same prompt twice gives the same tokens and the same kept counts.

A method registered without an entry in CONTRACT fails here, so no new method skips the contract.
"""

import pytest

from kvbench.engine.generate import generate_greedy
from kvbench.methods import REGISTRY, build_method
from tests.tiny_models import random_prompt, tiny_model

NUM_LAYERS = 4
PROMPT = 160
CAPACITY = 48
NEW_TOKENS = 8

#: method -> (options besides capacity, the most a layer may hold for CAPACITY, given as a function of the method)
CONTRACT = {
    "fullkv": ({}, None),
    "snapkv": ({}, lambda m: CAPACITY),
    # the bottom layer holds the most: 2P - P // beta prefix tokens plus the window (P = capacity - window)
    "pyramidkv": ({}, lambda m: 2 * (CAPACITY - 8) - (CAPACITY - 8) // m.beta + 8),
    # groups of 2 layers: the first group's budget of reviewable tokens, plus the suffix, plus up to a
    # window's worth when the short last window is dropped
    "windowkv": ({"task_type": "qa", "shared_layers": 2},
                 lambda m: 2 * CAPACITY - CAPACITY * 2 // m.beta + m.suffix_max + m.review_window_size - 1),
    "prefixkv": ({"prefix_config": "online"}, lambda m: PROMPT),  # per-layer budgets vary; their mean is exact
    "elastic": ({}, lambda m: CAPACITY),
    "h2o": ({}, lambda m: CAPACITY),
    "streamingllm": ({}, lambda m: CAPACITY),
}
#: methods whose layers hold exactly CAPACITY on average
MEAN_EXACT = {"snapkv", "prefixkv", "elastic", "h2o", "streamingllm"}


def test_every_registered_method_has_a_contract_entry():
    assert set(CONTRACT) == set(REGISTRY)


def keeping_everything(name, prompt_length):
    """The smallest capacity at which the method compresses nothing of a prompt of this length."""
    if name == "windowkv":
        options, _ = CONTRACT[name]
        return -(-prompt_length * REGISTRY["windowkv"].beta // options["shared_layers"])
    return prompt_length


def build(name, capacity):
    options, _ = CONTRACT[name]
    return build_method(name, **options, **({} if name == "fullkv" else {"capacity": capacity}))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_budget_at_least_the_prompt_keeps_everything_and_equals_fullkv(name, family):
    model = tiny_model(family, num_layers=NUM_LAYERS)
    prompt = random_prompt(60)
    full = generate_greedy(model, prompt, build_method("fullkv"), NEW_TOKENS, set())
    generation = generate_greedy(model, prompt, build(name, keeping_everything(name, 60)), NEW_TOKENS, set())
    assert generation.kept_per_layer == [60] * NUM_LAYERS
    assert generation.token_ids == full.token_ids


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_each_layer_holds_at_most_its_budget_and_runs_are_deterministic(name):
    model = tiny_model("llama", num_layers=NUM_LAYERS)
    prompt = random_prompt(PROMPT, seed=5)
    method = build(name, CAPACITY)
    first = generate_greedy(model, prompt, method, NEW_TOKENS, set())
    second = generate_greedy(model, prompt, method, NEW_TOKENS, set())
    assert (first.token_ids, first.kept_per_layer) == (second.token_ids, second.kept_per_layer)
    _, most = CONTRACT[name]
    if most is None:
        assert first.kept_per_layer == [PROMPT] * NUM_LAYERS
        return
    assert max(first.kept_per_layer) <= most(method)
    assert sum(first.kept_per_layer) < PROMPT * NUM_LAYERS
    if name in MEAN_EXACT:
        assert sum(first.kept_per_layer) == CAPACITY * NUM_LAYERS
