"""ReftModel.generate against a step-by-step full-forward reference, with and without the KV cache and with
every cache implementation transformers offers for the model (issue 19): the edits follow absolute positions,
so a forward that re-runs the prompt (use_cache=False) edits it again, a chunked prefill edits each chunk's
share, and decode steps past the prompt run no edit kernel."""
import copy

import pytest
import torch
import transformers

import reft_kernels as rk
from reft_kernels.integration.model import _Call, _past_length
from hf_models import VOCAB, tiny_model

V5 = int(transformers.__version__.split(".")[0]) >= 5
STEPS = 6

# cache modes: generate() keyword arguments. Lossless ones must give the full-forward reference's tokens.
LOSSLESS = {
    "default": {},  # what generate picks: a DynamicCache (sliding layers for mistral; 4.45's gemma2: HybridCache)
    # (cache_implementation=None: gemma2's generation config names "hybrid" in transformers 4.45, whose warning
    # about it under use_cache=False is malformed and raises inside pytest's log capture)
    "no_cache": {"use_cache": False, "cache_implementation": None},
    "static": {"cache_implementation": "static"},
}
if V5:  # chunked prefill exists in transformers 5.x only
    LOSSLESS["chunked_prefill"] = {"prefill_chunk_size": 3}
GPU_ONLY = {  # transformers' offloaded caches need CUDA streams
    "offloaded": {"cache_implementation": "offloaded"},
    "offloaded_static": {"cache_implementation": "offloaded_static"},
}


def _tiny(arch: str) -> torch.nn.Module:
    """float64 tiny decoders: llama; mistral with a sliding window shorter than the prompt (sliding-window
    cache layers); gemma2, which alternates sliding and full attention (transformers 4.45's HybridCache)."""
    if arch in ("llama", "mistral"):
        model = tiny_model(arch, **({"sliding_window": 4} if arch == "mistral" else {}))
    else:
        cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=12, intermediate_size=80,
                                        max_position_embeddings=64, sliding_window=4, initializer_range=0.2,
                                        hidden_activation="gelu_pytorch_tanh", pad_token_id=0)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5)  # peaked logits: tokens that depend on the edits
    return model.double()


def _setup(arch="llama", positions="l1"):
    """A random LoReFT adapter on `arch`, a copy of the base model for the reference, left-padded prompts."""
    base = _tiny(arch)
    ref_model = copy.deepcopy(base)
    reft = rk.get_reft_model(base, rk.ReftConfig(
        [{"layer": l, "low_rank_dimension": 3, "dtype": torch.float64} for l in (0, 2)], positions=positions))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reft.interventions.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    B, T = 3, 9
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, : 2 * b] = 0
        ids[b, : 2 * b] = 0
    locs = reft.locations(mask)
    return reft, ref_model, ids, mask, locs


def _reference_hooks(ref_model, reft, locs, prompt_length):
    """Hand-written float64 LoReFT hooks on the reference model with reft's parameters: a forward that covers
    the whole prompt (T >= prompt_length: a prefill, or a full re-run) gets the edits at `locs`; a decode
    step with a cache (T = 1) gets none."""
    handles = []
    for index, (key, iv) in enumerate(reft.interventions.items()):
        layer = ref_model.model.layers[int(key.split("_")[1])]

        def hook(module, args, output, iv=iv, index=index):
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[1] < prompt_length:
                return None
            rows = locs.repeat_interleave(h.shape[0] // locs.shape[0], 0)
            R, W, b = iv.lift().double(), iv.weight.double(), iv.bias.double()
            h = h.clone()
            for row in range(h.shape[0]):
                for p in set(rows[row, index].tolist()) - {-1}:
                    x = h[row, p]
                    h[row, p] = x + R.T @ (W @ x + b - R @ x)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(layer.register_forward_hook(hook))
    return handles


def _step_by_step(ref_model, ids, mask, steps=STEPS):
    """Greedy decoding by one full forward of the whole sequence per token (no cache), with the position ids
    generate() gives left-padded rows."""
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            position_ids = (m.cumsum(-1) - 1).clamp(min=0)
            logits = ref_model(input_ids=seq, attention_mask=m, position_ids=position_ids, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq


def _generate(model, ids, mask, mode_kwargs, **extra):
    kwargs = {**dict(attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0), **mode_kwargs, **extra}
    return model.generate(input_ids=ids, **kwargs)


CASES = [("llama", "l1", m) for m in LOSSLESS] + [("llama", "f2+l2", m) for m in LOSSLESS] + \
    [("mistral", "l1", m) for m in ("default", "no_cache", "static")] + \
    [("gemma2", "f2+l2", m) for m in ("default", "no_cache") + (("static",) if V5 else ())]
# (transformers 4.45's gemma2 fails with a StaticCache by itself, without any adapter)


@pytest.mark.parametrize("arch,positions,mode", CASES)
def test_generate_equals_the_step_by_step_reference(arch, positions, mode):
    reft, ref_model, ids, mask, locs = _setup(arch, positions)
    _reference_hooks(ref_model, reft, locs, ids.shape[1])
    want = _step_by_step(ref_model, ids, mask)
    got = _generate(reft, ids, mask, LOSSLESS[mode], intervention_locations=locs)
    assert torch.equal(got, want), (mode, got[:, ids.shape[1]:], want[:, ids.shape[1]:])
    plain = _generate(reft.model, ids, mask, LOSSLESS[mode])
    assert not torch.equal(plain, want)  # the edits change the tokens: the comparison means something


@pytest.mark.gpu
@pytest.mark.parametrize("mode", sorted(GPU_ONLY))
def test_generate_with_offloaded_caches(mode):
    reft, ref_model, ids, mask, locs = _setup("llama", "f2+l2")
    reft.cuda(), ref_model.cuda()
    ids, mask, locs = ids.cuda(), mask.cuda(), locs.cuda()
    _reference_hooks(ref_model, reft, locs, ids.shape[1])
    want = _step_by_step(ref_model, ids, mask)
    assert torch.equal(_generate(reft, ids, mask, GPU_ONLY[mode], intervention_locations=locs), want)


if V5:  # the fp8 quantized-cache backend exists in transformers 5.x only (4.45's need quanto or hqq)
    def test_generate_with_a_quantized_cache_matches_the_reference_with_that_cache():
        # lossy: the reference generates with the same cache (its hooks edit the prompt at prefill)
        mode = {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}}
        reft, ref_model, ids, mask, locs = _setup("llama", "f2+l2")
        _reference_hooks(ref_model, reft, locs, ids.shape[1])
        got = _generate(reft, ids, mask, mode, intervention_locations=locs)
        assert torch.equal(got, _generate(ref_model, ids, mask, mode))
        assert not torch.equal(got, _generate(reft.model, ids, mask, mode))


@pytest.mark.parametrize("mode", ["default", "no_cache", "static"])
@pytest.mark.parametrize("search", ["beams", "sampled"])
def test_beams_and_sampling_with_and_without_cache(mode, search):
    reft, ref_model, ids, mask, locs = _setup("llama", "l1")
    _reference_hooks(ref_model, reft, locs, ids.shape[1])
    extra = dict(num_beams=3, num_return_sequences=2) if search == "beams" else \
        dict(do_sample=True, top_k=0, num_return_sequences=2)
    kwargs = {**LOSSLESS[mode], **extra}
    torch.manual_seed(5)
    got = _generate(reft, ids, mask, kwargs, intervention_locations=locs)
    torch.manual_seed(5)
    want = _generate(ref_model, ids, mask, kwargs)
    torch.manual_seed(5)
    cached = _generate(reft, ids, mask, {**extra}, intervention_locations=locs)
    assert torch.equal(got, want) and torch.equal(got, cached)


def _count_edits(reft):
    calls = []
    for iv in reft.interventions.values():
        iv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    return calls


def test_decode_steps_run_no_edit_and_reruns_edit_again():
    reft, _, ids, mask, locs = _setup("llama", "f2+l2")
    calls = _count_edits(reft)
    _generate(reft, ids, mask, {}, intervention_locations=locs)
    assert calls == [ids.shape[1]] * 2  # the prompt, once per intervention; no edit kernel while decoding
    calls.clear()
    _generate(reft, ids, mask, {"use_cache": False}, intervention_locations=locs)
    assert calls == [ids.shape[1] + k for k in range(STEPS) for _ in range(2)]  # every full re-run
    if V5:
        calls.clear()
        _generate(reft, ids, mask, {"prefill_chunk_size": 4}, intervention_locations=locs)
        assert calls == [4, 4, 4, 4, 1, 1]  # chunks of 4, 4 and 1 prompt tokens, each with locations in it


def test_use_cache_false_in_the_config_generates_the_trained_text():
    # Trainer.train() leaves config.use_cache False (issue 19): generation must not change
    reft, _, ids, mask, locs = _setup("llama", "l1")
    want = _generate(reft, ids, mask, {}, intervention_locations=locs)
    reft.model.config.use_cache = False
    reft.model.generation_config.use_cache = False
    assert torch.equal(_generate(reft, ids, mask, {}, intervention_locations=locs), want)


def test_locations_past_the_prompt_are_refused():
    reft, _, ids, mask, locs = _setup("llama", "l1")
    with pytest.raises(ValueError, match="must index the prompt"):
        _generate(reft, ids, mask, {}, intervention_locations=torch.full_like(locs, ids.shape[1]))


class _NoSync(torch.Tensor):
    """A length that must not be read on the host (a device sync on a GPU)."""

    def __int__(self):
        raise AssertionError("host read of a device-side cache length")

    __index__ = item = __int__


class _StaticLikeCache:
    def __init__(self):
        self.length = torch.tensor(0).as_subclass(_NoSync)

    def get_seq_length(self):
        return self.length


def test_a_device_side_cache_length_is_counted_not_read():
    reft, _, _, _, locs = _setup("llama", "l1")
    state = _Call(reft, locs.transpose(0, 1), (), bound=9)
    cache = _StaticLikeCache()
    with pytest.raises(AssertionError, match="host read"):
        _past_length(state, (), {"cache": cache, "input_ids": torch.zeros(3, 9, dtype=torch.long)})
    state.fed[id(cache)] = (cache, 0)  # as after a prefill that found it empty (an int 0 in transformers 5.x)
    offsets = [_past_length(state, (), {"cache": cache, "input_ids": torch.zeros(3, n, dtype=torch.long)})
               for n in (9, 1, 1)]
    assert offsets == [0, 9, 10]
    state.offset = 9
    assert state.step_locations(3, 1) is None  # past the prompt: decided on the host, nothing runs
