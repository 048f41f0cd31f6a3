"""FGSM and PGD: they raise the loss, respect their norm ball and the input range, stop the
gradient where adversarial training needs it, and adversarial training is the ordinary step on
the attacked batch."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnn
from jnn import adversarial

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

B = 32


def _trained():
    splits = jnn.data.load("digits", val_fraction=0.1, seed=0)
    state = jnn.create_train_state(jnn.models.MLP(hidden_sizes=(64,), num_classes=10), optax.adam(3e-3),
                                   splits.train["inputs"][:1], 0)
    state = jnn.fit(state, jnn.data.Pipeline(splits.train, 64), num_steps=150, loss_fn="cross_entropy",
                    progress=False).state
    batch = {k: v[:B] for k, v in splits.test.items()}
    return state, batch


@pytest.fixture(scope="module")
def trained():
    return _trained()


def _loss(state, batch, inputs):
    return float(jnn.evaluate(state, [{**batch, "inputs": inputs}], loss_fn="cross_entropy")["loss"])


@pytest.mark.parametrize("attack", [adversarial.fgsm(0.1), adversarial.PGD(0.1, steps=5),
                                    adversarial.PGD(1.0, steps=5, norm="l2")], ids=["fgsm", "pgd_linf", "pgd_l2"])
def test_attacks_raise_the_loss_within_their_ball_and_the_input_range(trained, attack):
    state, batch = trained
    x = np.asarray(batch["inputs"])
    adv = np.asarray(jax.jit(lambda s, b: attack(s, b, "cross_entropy", jax.random.key(1)))(state, batch))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).reshape(B, -1)
    if attack.norm == "linf":
        assert np.abs(delta).max() <= attack.epsilon * (1 + 1e-6)
    else:
        assert np.linalg.norm(delta, axis=1).max() <= attack.epsilon * (1 + 1e-5)
    clean, attacked = _loss(state, batch, x), _loss(state, batch, adv)
    print(f"{attack.norm} eps {attack.epsilon} x{attack.steps}: loss {clean:.3f} -> {attacked:.3f}")
    assert attacked > 2 * clean


def test_pgd_is_at_least_as_strong_as_fgsm_and_random_noise_is_weaker(trained):
    state, batch = trained
    key = jax.random.key(1)
    losses = {name: _loss(state, batch, attack(state, batch, "cross_entropy", key)) for name, attack in
              (("fgsm", adversarial.fgsm(0.1)), ("pgd", adversarial.PGD(0.1, steps=10)))}
    noise = np.clip(batch["inputs"] + 0.1 * np.sign(np.random.default_rng(0).normal(size=batch["inputs"].shape)),
                    0, 1).astype(np.float32)
    assert losses["pgd"] >= losses["fgsm"] > _loss(state, batch, noise)


def test_the_attack_stops_the_gradient(trained):
    """No gradient reaches the parameters through the attack: adversarial training differentiates the
    loss at the perturbed point only (Danskin), which is also what makes it affordable."""
    state, batch = trained
    attack = adversarial.PGD(0.1, steps=3)
    through = jax.grad(lambda p: jnp.sum(attack(state.replace(params=p), batch, "cross_entropy",
                                                jax.random.key(0))))(state.params)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(through))


def test_adversarial_step_is_the_plain_step_on_the_attacked_batch(trained):
    state, batch = trained
    attack = adversarial.PGD(0.1, steps=3)
    rng = jnn.train.step.step_rng(state)
    adv = attack(state, batch, "cross_entropy", rng)
    plain = jax.jit(jnn.make_train_step("cross_entropy"))
    for mix, n in ((1.0, B), (0.25, B // 4)):
        got, _ = jax.jit(adversarial.make_adversarial_train_step("cross_entropy", attack, mix=mix))(state, batch)
        mixed = np.concatenate([np.asarray(adv)[:n], batch["inputs"][n:]])
        want, _ = plain(state, {**batch, "inputs": mixed})
        chex.assert_trees_all_close(got.params, want.params, rtol=1e-6, atol=1e-7)
    got, _ = jax.jit(adversarial.make_adversarial_train_step("cross_entropy", attack, mix=0.0))(state, batch)
    chex.assert_trees_all_equal(got.params, plain(state, batch)[0].params)


def test_robust_evaluation_reports_lower_accuracy(trained):
    state, batch = trained
    clean = jnn.evaluate(state, [batch], loss_fn="cross_entropy")
    robust = jnn.evaluate(state, [batch], jax.jit(adversarial.make_robust_eval_step("cross_entropy",
                                                                                   adversarial.PGD(0.2, steps=5))))
    assert robust["accuracy"] < clean["accuracy"] and robust["loss"] > clean["loss"]


def test_bad_attacks_are_refused():
    with pytest.raises(ValueError, match=r"epsilon=0.0; expected epsilon > 0"):
        adversarial.PGD(0.0)
    with pytest.raises(ValueError, match=r"norm='l1'; expected norm one of \['linf', 'l2'\]"):
        adversarial.PGD(0.1, norm="l1")
    with pytest.raises(ValueError, match=r"mix=1.5; expected a fraction in \[0, 1\]"):
        adversarial.make_adversarial_train_step("cross_entropy", adversarial.fgsm(0.1), mix=1.5)
    state = jnn.create_train_state(jnn.models.get("gpt_char_tiny", vocab_size=11, block_size=8), optax.adam(1e-3),
                                   np.zeros((1, 8), np.int32), 0)
    batch = {"inputs": np.zeros((2, 8), np.int32), "labels": np.zeros((2, 8), np.int32)}
    with pytest.raises(ValueError, match=r"dtype int32; expected floating-point inputs"):
        adversarial.fgsm(0.1)(state, batch, "cross_entropy", jax.random.key(0))
