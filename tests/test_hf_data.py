"""From text to a Trainer (issue 19): reft_example takes what tokenizers return, make_data_module (and
pyreft's two data-module names) gives a Trainer-ready dataset and collator, and the stock Trainer keeps the
columns ReftModel needs with its default remove_unused_columns=True, in transformers 5.x and 4.45."""
import inspect

import pytest
import torch
import transformers
import reft_kernels as rk
from hf_models import char_tokenizer as _tokenizer
from hf_models import tiny_model

PAIRS = [("what is one?", "a"), ("say hello.", "hi"), ("count: ", "ab"), ("ok?", "y")]


def _reft(positions="f1+l1", **config):
    base = tiny_model("llama")
    with torch.no_grad():
        base.lm_head.weight.mul_(10)
    return rk.get_reft_model(base, rk.ReftConfig(
        [{"layer": l, "low_rank_dimension": 4, "dtype": torch.float32} for l in range(3)], positions=positions,
        **config))


def test_reft_example_takes_tokenizer_tensors():
    cfg = rk.ReftConfig({"layer": 0, "rank": 1}, positions="last")
    want = rk.reft_example([1, 5, 6], [7, 2], cfg, 1)
    for prompt, answer in ((torch.tensor([[1, 5, 6]]), torch.tensor([[7, 2]])),  # return_tensors="pt"
                           (torch.tensor([1, 5, 6]), torch.tensor([7, 2])), ([[1, 5, 6]], [[7, 2]]), ((1, 5, 6), [7, 2])):
        got = rk.reft_example(prompt, answer, cfg, 1)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert want["intervention_locations"].tolist() == [[2]]
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*once per row"):
        rk.reft_example(torch.ones(2, 3, dtype=torch.long), [7], cfg, 1)
    with pytest.raises(ValueError, match="token ids"):
        rk.reft_example(torch.ones(3), [7], cfg, 1)
    with pytest.raises(ValueError, match="token ids"):
        rk.reft_example("hello", [7], cfg, 1)


def test_make_data_module_trains_with_the_stock_trainer_defaults(tmp_path):
    tok = _tokenizer()
    reft = _reft()
    data = rk.make_data_module(tok, reft, [p for p, _ in PAIRS], [a for _, a in PAIRS])
    assert set(data) == {"train_dataset", "eval_dataset", "data_collator"}
    first = data["train_dataset"][0]
    ids = tok(PAIRS[0][0] + PAIRS[0][1])["input_ids"] + [tok.eos_token_id]
    n = len(tok(PAIRS[0][0])["input_ids"])
    assert first["input_ids"].tolist() == ids
    assert first["labels"].tolist() == [-100] * n + ids[n:]
    assert first["intervention_locations"].tolist() == [[0, n - 1]] * 3  # f1+l1 of the prompt
    # remove_unused_columns left at its default (True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=15,
                                          learning_rate=4e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=reft, args=args, **data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


def test_pyreft_data_module_names():
    tok = _tokenizer()
    prompts, outputs = [p for p, _ in PAIRS], [a for _, a in PAIRS]
    reft = _reft(positions=None)
    data = rk.make_last_position_supervised_data_module(tok, reft, prompts, outputs, num_interventions=3)
    n = len(tok(prompts[1])["input_ids"])
    assert data["train_dataset"][1]["intervention_locations"].tolist() == [[n - 1]] * 3
    assert reft.reft_config.positions == "last"  # recorded: locations() at generation uses the same scheme
    with pytest.raises(ValueError, match="positions='last'"):
        rk.make_multiple_position_supervised_data_module(tok, reft, prompts, outputs, positions="f1+l1")
    with pytest.raises(ValueError, match="num_interventions=1, but the adapter has 3"):
        rk.make_last_position_supervised_data_module(tok, reft, prompts, outputs, num_interventions=1)
    untied = _reft(positions="f1+l1", share_weights=False)
    data = rk.make_multiple_position_supervised_data_module(tok, untied, prompts, outputs, positions="f1+l1",
                                                            num_interventions=6, share_weights=False)
    assert data["train_dataset"][0]["intervention_locations"].shape == (6, 1)
    with pytest.raises(ValueError, match="share_weights=False"):
        rk.make_multiple_position_supervised_data_module(tok, reft, prompts, outputs, positions="last",
                                                         share_weights=False)
    with pytest.raises(TypeError, match="the reft_kernels ReftModel"):
        rk.make_last_position_supervised_data_module(tok, reft.model, prompts, outputs)
    with pytest.raises(ValueError, match="same length"):
        rk.make_data_module(tok, reft, prompts, outputs[:2])


def test_trainer_keeps_the_base_model_inputs_without_remove_unused_columns_false(tmp_path):
    reft = rk.get_reft_model(tiny_model("bert"), rk.ReftConfig({"layer": 0, "low_rank_dimension": 2},
                                                               positions="f1", unfrozen_modules=["classifier"]))
    params = inspect.signature(reft.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "intervention_locations", "token_type_ids"} <= set(params)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 90, (5,), generator=g), "token_type_ids": torch.tensor([0, 0, 1, 1, 1]),
                 "intervention_locations": torch.tensor([[0]]), "label": i % 3} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, disable_tqdm=True)  # remove_unused_columns: default True
    trainer = transformers.Trainer(model=reft, args=args, train_dataset=examples, data_collator=rk.ReftDataCollator())
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"input_ids", "token_type_ids", "intervention_locations", "labels"} <= set(batch)
    assert batch["token_type_ids"][0].tolist() == [0, 0, 1, 1, 1]
