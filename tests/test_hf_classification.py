"""examples/classify.py end to end: LoReFT on every layer of a tiny random-init RoBERTa classifier at the
first token, the head unfrozen, trained with the stock transformers.Trainer, saved and reloaded.

Checks: accuracy rises clearly above chance; only intervention and classifier parameters changed (the
frozen encoder is bitwise unchanged); the adapter reloaded on a fresh copy of the base model gives
bitwise-equal logits; the trained model's own no-grad forward uses the trained rotations.
"""
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150


def _load_example():
    spec = importlib.util.spec_from_file_location("reft_example_classify", os.path.join(ROOT, "examples", "classify.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    example = _load_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a small shared machine
    try:
        result = example.main(["--steps", str(STEPS), "--quiet", "--output-dir", str(tmp_path_factory.mktemp("cls"))])
    finally:
        torch.set_num_threads(threads)
    result["example"] = example
    return result


def test_accuracy_improves_over_chance(run):
    chance = 1 / run["example"].NUM_LABELS
    assert run["acc_before"] < chance + 0.12, run["acc_before"]
    assert run["acc_after"] >= 0.6, (run["acc_before"], run["acc_after"])
    assert run["acc_after"] >= run["acc_before"] + 0.2, (run["acc_before"], run["acc_after"])
    losses = [e["loss"] for e in run["log_history"] if "loss" in e]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses


def test_only_adapter_parameters_changed(run):
    reft, initial = run["reft"], run["initial_parameters"]
    params = dict(reft.named_parameters())
    assert params.keys() == initial.keys()
    adapter = {n for n in params if n.startswith("interventions.") or n.startswith("model.classifier.")}
    assert {n for n, p in params.items() if p.requires_grad} == adapter
    assert any(n.startswith("interventions.") for n in adapter) and any(n.startswith("model.classifier.") for n in adapter)
    changed = {n for n, p in params.items() if not torch.equal(p.detach(), initial[n])}
    assert changed == adapter, (sorted(adapter - changed), sorted(changed - adapter))
    # the adapter's state_dict (what save_pretrained writes) is exactly these, plus the rotations' buffers
    keys = set(reft.state_dict())
    assert adapter <= keys and all(k.startswith("interventions.") for k in keys - adapter)


def test_reload_gives_bitwise_equal_logits(run):
    example, reft, reloaded, batch = run["example"], run["reft"], run["reloaded"], run["eval_batch"]
    assert run["reload_equal"]
    assert torch.equal(example.logits_of(reft, batch), example.logits_of(reloaded, batch))
    a, b = reft.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the reloaded base model is a separate object and its encoder is frozen
    assert reloaded.model is not reft.model
    assert not any(p.requires_grad for n, p in reloaded.model.named_parameters() if not n.startswith("classifier."))


def test_trained_model_forward_uses_trained_rotations(run):
    """After Trainer (whose default optimizer is fused AdamW), the trained model's no-grad forward must
    use R from the trained parameters, not one cached before training. load_state_dict of its own state
    drops every cache, so the logits must not change across it."""
    example, reft, batch = run["example"], run["reft"], run["eval_batch"]
    cached = example.logits_of(reft, batch)
    reft.load_state_dict({k: v.clone() for k, v in reft.state_dict().items()})
    fresh = example.logits_of(reft, batch)
    assert torch.equal(cached, fresh), (
        f"max |diff| {(cached - fresh).abs().max().item():.3g}: a stale orthonormal R cache survived training")
