"""verify.py's checks for the Gemma faults peer deployments shipped, each run on CPU against the transformers
reference, each with a control that must fail it: image-prompt logits by KL with a causal-only image mask,
one BOS in the templated ids, lm_head tied to the embedding, fp16 refused. (The FP8 checkpoint's quantized
MLP linears are checked on real ModelOpt exports in tests/test_gpu_checkpoints.py.)
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from medgemma_triton.gpu import verify  # noqa: E402
from medgemma_triton.spec import ModelSpec  # noqa: E402


@pytest.fixture(scope="module", params=["tiny", "dev"])
def checkpoint(request):
    """(checkpoint, spec, processor, fp32 transformers model) for tiny and dev."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return checkpoint, ModelSpec.from_checkpoint(checkpoint), AutoProcessor.from_pretrained(checkpoint), model


def test_image_prompt_kl_passes_bf16_and_fails_a_causal_only_mask(checkpoint):
    """The reference's weights run in bf16 stay within IMAGE_KL_LIMIT of fp32; the same bf16 run with image
    tokens attending causally (transformers without token_type_ids: vLLM #40106's fault) does not on dev (real
    weights; the limit is set for them). On tiny's random weights every KL is small, but the control's is
    still over a hundred times the bf16 one (both models measure 480x or more)."""
    from medgemma_triton.gpu.checkpoint_quality import image_mask_checks

    path, spec, processor, model = checkpoint
    result = image_mask_checks(model, processor, spec)
    print({name: {k: round(v, 8) if isinstance(v, float) else v for k, v in kl.items()} for name, kl in result["kl"].items()})
    assert result["passes"].passed, result["passes"]
    assert result["kl"]["bf16_causal_control"]["mean"] > 100 * result["kl"]["bf16"]["mean"]
    if path.name == "dev":
        assert result["control_fails"], result["kl"]["bf16_causal_control"]


def test_image_kl_needs_an_image_prompt(checkpoint):
    _, spec, processor, model = checkpoint
    messages, _ = next(chat for chat in verify.acceptance_chats(spec.vision.image_size) if chat[1] is None)
    inputs = verify.image_inputs(processor, messages, None)
    logits = verify.prompt_logits(model, inputs)
    with pytest.raises(ValueError, match="no image token"):
        verify.image_kl(logits, logits, inputs["input_ids"], spec.tokens.image)


def test_one_bos_in_served_and_reference_templated_ids(checkpoint):
    """The serving preprocessing's ids (PromptBuilder) and the processor's hold one BOS and agree; the classic
    fault, the rendered template (which writes <bos>) tokenized with special tokens added, has two."""
    from medgemma_triton.runtime.chat import PromptBuilder
    from medgemma_triton.runtime.limits import Limits

    checkpoint, spec, processor, _ = checkpoint
    builder = PromptBuilder(spec, checkpoint, Limits())
    for messages, image in verify.acceptance_chats(spec.vision.image_size)[-2:]:
        processor_ids = verify.image_inputs(processor, messages, image)["input_ids"][0].tolist()
        served_ids = builder.build(messages, 1 if image is not None else 0).tolist()
        assert served_ids == processor_ids
        assert verify.check_one_bos(served_ids, spec.tokens.bos).passed
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        doubled = processor.tokenizer(rendered, add_special_tokens=True)["input_ids"]
        check = verify.check_one_bos(doubled, spec.tokens.bos)
        assert not check.passed and "2 BOS" in check.detail, check


def test_lm_head_tied_and_an_untied_load_caught(checkpoint, tmp_path):
    """The reference loads lm_head as the embedding; the same checkpoint loaded with tie_word_embeddings off
    (TensorRT-LLM PR #10096, vLLM #20549: an lm_head not tied) fails the check."""
    import json
    import shutil

    from transformers import AutoModelForImageTextToText

    checkpoint, _, _, model = checkpoint
    assert verify.check_tied_lm_head(model).passed
    untied = tmp_path / "untied"
    shutil.copytree(checkpoint, untied)
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config.setdefault("text_config", {})["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    check = verify.check_tied_lm_head(AutoModelForImageTextToText.from_pretrained(untied, dtype=torch.float32))
    assert not check.passed, check


def test_fp16_is_refused_where_the_gpu_profile_picks_a_dtype(tiny_checkpoint):
    from medgemma_triton.gpu.dequantize import load_dequantized

    for dtype in ("bfloat16", "float32", torch.bfloat16):
        verify.refuse_fp16(dtype, "test")
    for dtype in ("float16", torch.float16, torch.half):
        with pytest.raises(ValueError, match="float16 activations overflow"):
            verify.refuse_fp16(dtype, "test")
    with pytest.raises(ValueError, match="float16"):
        verify.reference_tokens(tiny_checkpoint, [], 4, device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="float16"):
        load_dequantized(tiny_checkpoint, dtype="float16")


def test_acceptance_against_a_served_model_checks_prompts(tiny_server, tiny_checkpoint, tmp_path):
    """verify's acceptance run end to end against the cpu profile's served tiny model (the same contract
    the gpu profile serves), reference in fp32 on CPU: agreement, one BOS and served prompt lengths all pass; the
    same served lengths off by one (a second BOS) fail the prompt check."""
    import json

    report = tmp_path / "acceptance.json"
    code = verify.main(["--url", tiny_server.url, "--checkpoint", str(tiny_checkpoint), "--precision", "bf16",
                        "--device", "cpu", "--dtype", "float32", "--max-tokens", "8", "--latency-cmd", "",
                        "--report", str(report)])
    result = json.loads(report.read_text())
    assert code == 0 and result["passed"], result
    assert len(result["checks"]) == 2 * len(verify.ACCEPTANCE_PROMPTS)
    chats = verify.acceptance_chats(ModelSpec.from_checkpoint(tiny_checkpoint).vision.image_size)
    lengths = [int(c["detail"].split("reference ")[1]) for c in result["checks"] if c["name"].startswith("prompt_tokens")]
    shifted = verify.reference_checks(tiny_checkpoint, chats, [n + 1 for n in lengths])
    assert [c.passed for c in shifted if c.name.startswith("prompt_tokens")] == [False] * len(chats)


def test_why_fp16_is_refused_dev_activations_exceed_its_range(checkpoint):
    """On real Gemma 3 weights (dev) the fp32 reference's residual stream on an image chat exceeds fp16's largest
    finite value, so an fp16 run overflows."""
    path, spec, processor, model = checkpoint
    if path.name != "dev":
        pytest.skip("tiny's random weights make no claim about activation range")
    messages, image = next(chat for chat in verify.acceptance_chats(spec.vision.image_size) if chat[1] is not None)
    with torch.inference_mode():
        hidden = model(**verify.image_inputs(processor, messages, image), output_hidden_states=True).hidden_states
    largest = max(float(h.abs().max()) for h in hidden)
    print(f"{path.name}: largest |activation| {largest:.1f}, fp16 max {torch.finfo(torch.float16).max:.0f}")
    assert largest > torch.finfo(torch.float16).max
