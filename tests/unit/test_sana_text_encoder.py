"""Sana's Gemma-2 text conditioning (host/sana_text_encoder.py) against diffusers' SanaPipeline.encode_prompt.

The reference is diffusers 0.42.1 `SanaPipeline.encode_prompt` with transformers'
`Gemma2ForCausalLM(...).get_decoder()` (eager attention: softcap applied) and `GemmaTokenizer` read
from the tiny Hugging Face folder, given the official CHI list and max_sequence_length=300. Our side
reads the same weights through ComfyUI's CLIP, as core's CLIPTextEncode calls it.

diffusers lower-cases and strips prompts when clean_caption=False; the official pipeline and ours do
not, so every prompt here is already lower case and stripped.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

RTOL_FP32 = 1e-5
PROMPTS = (
    "a small fluffy white cat sleeping on a windowsill",
    "neon sign reading open 24h, 3 am, rain!",
    # more than 300 tokens with the tiny vocabulary: exercises the truncation of CHI + prompt
    ", ".join(["a glass sphere containing a miniature galaxy, watercolor, 35mm photo"] * 30),
)
NEGATIVES = ("", "blurry, low quality, extra fingers")


@pytest.fixture(scope="module")
def te(comfy_host):
    from velox.host import sana_text_encoder

    return sana_text_encoder


@pytest.fixture(scope="module")
def tiny_sources(comfy_host, tmp_path_factory):
    from velox.tiny.gemma import write_tiny_gemma_hf_folder, write_tiny_gemma_single_file

    root = tmp_path_factory.mktemp("tiny_gemma")
    return {"single_file": write_tiny_gemma_single_file(root / "gemma_2_tiny.safetensors"),
            "hf_folder": write_tiny_gemma_hf_folder(root / "gemma-2-tiny-it")}


def hf_decoder(folder):
    from transformers import Gemma2ForCausalLM

    return Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").get_decoder()


@pytest.fixture(scope="module")
def reference(tiny_sources, te):
    from diffusers import SanaPipeline
    from transformers import GemmaTokenizer

    folder = tiny_sources["hf_folder"]
    pipe = SanaPipeline(tokenizer=GemmaTokenizer.from_pretrained(folder), text_encoder=hf_decoder(folder),
                        vae=None, transformer=None, scheduler=None)

    def encode(prompt, negative):
        with torch.no_grad():
            return pipe.encode_prompt(prompt, negative_prompt=negative, device=torch.device("cpu"),
                                      complex_human_instruction=list(te.SANA_COMPLEX_HUMAN_INSTRUCTION),
                                      max_sequence_length=300)

    return encode


@pytest.fixture(scope="module")
def clips(tiny_sources, te):
    return {name: te.load_sana_text_encoder(path) for name, path in tiny_sources.items()}


def encode(clip, text, **kwargs):
    """What core CLIPTextEncode does: tokenize, then encode_from_tokens_scheduled."""
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text, **kwargs))
    assert len(conditioning) == 1
    cond, extra = conditioning[0]
    return cond, extra["attention_mask"]


def rel_l2(ours, ref):
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("source", ["single_file", "hf_folder"])
def test_positive_with_chi_and_plain_negative_match_diffusers_encode_prompt(clips, reference, source):
    clip = clips[source]
    for prompt, negative in zip(PROMPTS, NEGATIVES + NEGATIVES[:1]):
        ref_cond, ref_mask, ref_neg, ref_neg_mask = reference(prompt, negative)
        cond, mask = encode(clip, prompt)
        neg, neg_mask = encode(clip, negative, sana_chi=False)

        assert cond.shape == (1, 300, 64) and mask.shape == (1, 300) and neg.shape == (1, 300, 64)
        assert rel_l2(cond, ref_cond) <= RTOL_FP32, prompt
        assert rel_l2(neg, ref_neg) <= RTOL_FP32, negative
        assert torch.equal(mask.long(), ref_mask.long()) and torch.equal(neg_mask.long(), ref_neg_mask.long())


def test_core_clip_text_encode_node_gives_sana_conditioning_with_mask(clips):
    import nodes

    clip = clips["single_file"]
    ((cond, extra),) = nodes.CLIPTextEncode().encode(clip, PROMPTS[0])[0]
    ref_cond, ref_mask = encode(clip, PROMPTS[0])
    assert torch.equal(cond, ref_cond) and torch.equal(extra["attention_mask"], ref_mask)
    assert extra["attention_mask"].dtype == torch.long and int(extra["attention_mask"].sum()) < 300


def test_default_config_builds_the_gemma_2_2b_layout_of_transformers(te):
    """What a Comfy-Org single file (no config) gets: the 2B's 288 tensors, names and shapes as transformers'."""
    import comfy.ops
    from transformers import Gemma2Config, Gemma2ForCausalLM

    ours = te.SanaGemma2(te.gemma2_core_config({}, None), torch.bfloat16, "meta", comfy.ops.manual_cast)
    with torch.device("meta"):
        theirs = Gemma2ForCausalLM(Gemma2Config())
    expected = {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("lm_head.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == expected and len(expected) == 288


def test_chi_length_and_selection_follow_the_reference_arithmetic(clips, te):
    tokenizer = clips["single_file"].tokenizer
    chi_tokens = len(tokenizer.pieces.encode("\n".join(te.SANA_COMPLEX_HUMAN_INSTRUCTION)))  # BOS included
    positive = tokenizer.tokenize_with_weights("a cat")[te.TOKENS_KEY][0]
    negative = tokenizer.tokenize_with_weights("a cat", sana_chi=False)[te.TOKENS_KEY][0]

    assert len(positive) == chi_tokens + 300 - 2 and len(negative) == 300
    assert positive[0][0] == negative[0][0] == 2 and positive[-1][0] == negative[-1][0] == 0  # BOS ... right pad
    assert te.sana_select_index(len(positive)) == [0] + list(range(len(positive) - 299, len(positive)))
    assert te.sana_select_index(300) == list(range(300))


def test_tokenizer_json_only_folder_encodes_like_sentencepiece(clips, tiny_sources, te, tmp_path):
    folder = shutil.copytree(tiny_sources["hf_folder"], tmp_path / "gemma-json-only")
    (folder / "tokenizer.model").unlink()
    clip = te.load_sana_text_encoder(folder)

    assert isinstance(clip.tokenizer.pieces, te.TokenizersGemma)
    for prompt in PROMPTS[:2]:
        assert clip.tokenize(prompt) == clips["single_file"].tokenize(prompt)
        assert torch.equal(encode(clip, prompt)[0], encode(clips["hf_folder"], prompt)[0])


def test_sana_diffusers_folder_reads_text_encoder_and_tokenizer_subfolders(clips, tiny_sources, te, tmp_path):
    source = tiny_sources["hf_folder"]
    pipeline = tmp_path / "Sana_tiny_diffusers"
    (pipeline / "text_encoder").mkdir(parents=True)
    (pipeline / "tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, pipeline / "text_encoder" / name)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, pipeline / "tokenizer" / name)

    cond, mask = encode(te.load_sana_text_encoder(pipeline), PROMPTS[0])
    ref_cond, ref_mask = encode(clips["hf_folder"], PROMPTS[0])
    assert torch.equal(cond, ref_cond) and torch.equal(mask, ref_mask)


def test_bf16_checkpoint_matches_transformers_on_the_same_rounded_weights(tiny_sources, te, tmp_path):
    # core's RMSNorm adds 1 to a bf16 weight in bf16 (0.8 % off here); ours keeps norm weights in fp32
    folder = shutil.copytree(tiny_sources["hf_folder"], tmp_path / "gemma-bf16")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(folder / "model.safetensors"))
    clip = te.load_sana_text_encoder(folder)
    tokens = clip.tokenize(PROMPTS[0], sana_chi=False)
    ids = torch.tensor([[token for token, _ in tokens[te.TOKENS_KEY][0]]])

    with torch.no_grad():
        ref = hf_decoder(folder)(ids, attention_mask=(ids != 0).long())[0]
    gemma = clip.cond_stage_model.gemma2_2b.transformer.model
    assert gemma.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16 and gemma.norm.weight.dtype == torch.float32
    assert rel_l2(encode(clip, PROMPTS[0], sana_chi=False)[0], ref) <= RTOL_FP32


@pytest.mark.parametrize("override", [{"attn_logit_softcapping": None}, {"query_pre_attn_scalar": 32},
                                      {"sliding_window": 4096}], ids=["softcap", "scale", "sliding_window"])
def test_tiny_gemma_exercises_what_core_gemma2_lacks(tiny_sources, te, override):
    """Each HF Gemma-2 feature that core's class lacks changes the tiny model's output by > 1 %,
    so the parity test above would fail without our handling of it."""
    from transformers import GemmaTokenizer

    folder = tiny_sources["hf_folder"]
    model = hf_decoder(folder)
    config = copy.deepcopy(model.config)
    for key, value in override.items():
        setattr(config, key, value)
    variant = type(model)(config).eval()
    variant.load_state_dict(model.state_dict())
    inputs = GemmaTokenizer.from_pretrained(folder)(["\n".join(te.SANA_COMPLEX_HUMAN_INSTRUCTION)],
                                                     return_tensors="pt")
    with torch.no_grad():
        assert rel_l2(variant(**inputs)[0], model(**inputs)[0]) > 1e-2


def test_missing_tokenizer_files_raise_naming_the_folder(tiny_sources, te, tmp_path):
    from velox.errors import VeloxLoadError

    folder = shutil.copytree(tiny_sources["hf_folder"], tmp_path / "gemma-no-tokenizer")
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(VeloxLoadError, match=r"gemma-no-tokenizer: has no Gemma tokenizer files.*tokenizer\.model"):
        te.load_sana_text_encoder(folder)


def test_single_file_without_embedded_tokenizer_raises(tiny_sources, te, tmp_path):
    from velox.errors import VeloxLoadError

    weights = load_file(tiny_sources["single_file"])
    del weights["spiece_model"]
    path = tmp_path / "gemma_no_spiece.safetensors"
    save_file(weights, str(path))
    with pytest.raises(VeloxLoadError, match="gemma_no_spiece.safetensors: .*no 'spiece_model'"):
        te.load_sana_text_encoder(path)


def test_single_file_without_config_must_have_gemma_2_2b_shapes(tiny_sources, te, tmp_path):
    from velox.errors import VeloxLoadError

    path = tmp_path / "gemma_tiny_no_metadata.safetensors"
    save_file(load_file(tiny_sources["single_file"]), str(path))  # drops the config in the metadata
    with pytest.raises(VeloxLoadError, match="width 64 and 2 layers, the config says 256000, 2304 and 26"):
        te.load_sana_text_encoder(path)


WRONG_FILES = {
    "sana_transformer": ({"blocks.0.attn.qkv.weight": torch.zeros(6, 2), "x_embedder.proj.weight": torch.zeros(2, 2)},
                         "looks like a Sana transformer"),
    "t5": ({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(2, 2), "shared.weight": torch.zeros(4, 2)},
           "looks like a T5 encoder"),
    "gemma3": ({"model.layers.0.post_feedforward_layernorm.weight": torch.zeros(2),
                "model.layers.0.self_attn.q_norm.weight": torch.zeros(2)}, "q/k-norm"),
}


@pytest.mark.parametrize("kind", list(WRONG_FILES))
def test_wrong_file_into_gemma_loader_raises(te, tmp_path, kind):
    from velox.errors import VeloxLoadError

    weights, message = WRONG_FILES[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(weights, str(path))
    with pytest.raises(VeloxLoadError, match=f"{kind}.safetensors: is not a Gemma-2 text encoder.*{message}"):
        te.load_sana_text_encoder(path)


def test_t5_folder_into_gemma_loader_raises(te, tmp_path):
    from velox.errors import VeloxLoadError

    folder = tmp_path / "t5-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    with pytest.raises(VeloxLoadError, match="config.json: model_type is 't5'; expected 'gemma2'"):
        te.load_sana_text_encoder(folder)


def test_a_family_instruction_matches_sana_video_encode_prompt(clips, tiny_sources, te):
    """`sana_chi` given as lines (SANA-Video's instruction) equals `SanaVideoPipeline.encode_prompt`."""
    import inspect

    from diffusers import SanaVideoPipeline
    from transformers import GemmaTokenizer

    folder = tiny_sources["hf_folder"]
    instruction = inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default
    pipe = SanaVideoPipeline(tokenizer=GemmaTokenizer.from_pretrained(folder), text_encoder=hf_decoder(folder),
                             vae=None, transformer=None, scheduler=None)
    for prompt in PROMPTS:
        with torch.no_grad():
            ref_cond, ref_mask, *_ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                        device=torch.device("cpu"),
                                                        complex_human_instruction=instruction, max_sequence_length=300)
        cond, mask = encode(clips["single_file"], prompt, sana_chi=tuple(instruction))
        assert cond.shape == ref_cond.shape and rel_l2(cond, ref_cond) <= RTOL_FP32, prompt
        assert torch.equal(mask.long(), ref_mask.long())
