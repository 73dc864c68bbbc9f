"""Language model + tokenizer: the real loading code (local folders standing in for hub names), the
`<image>`/pad tokens and embedding resize as llava-hf does it, and the offline tiny tokenizers."""

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM

from llava_lightning.model import LanguageSpec, VisionSpec, build_vision_tower
from llava_lightning.model.language_model import build_language_model
from llava_lightning.model.presets import TINY_CLIP, TINY_LLAMA
from llava_lightning.model.tiny_tokenizer import build_tiny_tokenizer


def test_vision_tower_loads_vision_half_of_a_full_clip_checkpoint_by_path(tmp_path):
    vision = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision,
            text_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        )
    )
    clip.save_pretrained(tmp_path)
    CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    tower = build_vision_tower(VisionSpec(name=str(tmp_path)))  # the from_pretrained path, as for a hub name
    assert tower.image_mean == (0.1, 0.2, 0.3) and tower.image_std == (0.4, 0.5, 0.6)
    theirs = clip.vision_model.state_dict()
    ours = tower.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_language_model_loads_by_path_and_gains_image_and_pad_tokens(tmp_path):
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    tok = build_tiny_tokenizer("llama")
    n = len(tok)  # a model whose vocabulary is exactly its tokenizer's, as on the hub
    lm = LlamaForCausalLM(LlamaConfig(**{**cfg, "vocab_size": n}))
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer, image_id = build_language_model(LanguageSpec(name=str(tmp_path)))
    assert tokenizer.convert_ids_to_tokens(image_id) == "<image>"
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == n + 2
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == -(-(n + 2) // 64) * 64  # rounded up to a multiple of 64
    assert torch.equal(emb[:n], lm.get_input_embeddings().weight)
    assert tokenizer("a <image> b", add_special_tokens=False)["input_ids"].count(image_id) == 1


def test_llama2_tokenizer_gets_llava_hf_ids(llama2_tokenizer_dir):
    spec = LanguageSpec(
        name="vicuna-shaped",
        tokenizer=str(llama2_tokenizer_dir),
        config={
            **TINY_LLAMA,
            "vocab_size": 32000,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
    )
    model, tokenizer, image_id = build_language_model(spec)
    # llava-hf: <image> = 32000, <pad> = 32001, vocabulary padded to 32064 (llava-hf/llava-1.5-7b-hf)
    assert image_id == 32000
    assert tokenizer.convert_tokens_to_ids("<pad>") == 32001
    assert model.get_input_embeddings().weight.shape[0] == 32064


@pytest.mark.parametrize("family", ["llama", "chatml"])
def test_tiny_tokenizers_are_built_offline_and_round_trip(family):
    tok = build_tiny_tokenizer(family, vocab_size=800)  # a size no other test uses: trained here
    text = "USER: What colour is the star? ASSISTANT: It is purple, 3 of them. Ünïcode ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if family == "llama":
        assert tok(text)["input_ids"][0] == tok.bos_token_id == 1 and tok.eos_token == "</s>"
    else:
        assert tok.eos_token == "<|im_end|>"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hub_named_parts_build_from_their_configs_alone_as_a_meta_skeleton(tmp_path):
    # What `LlavaLitModule(sharded_init=True)` builds on every rank before sharding: no weights read.
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava_lightning.model import LlavaModel, LlavaSpec

    vision = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor().save_pretrained(tmp_path / "clip")
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(tmp_path / "lm")
    build_tiny_tokenizer("llama").save_pretrained(tmp_path / "lm")
    spec = LlavaSpec(
        vision=VisionSpec(name=str(tmp_path / "clip")), language=LanguageSpec(name=str(tmp_path / "lm"))
    )
    loaded = LlavaModel.from_spec(spec)
    with torch.device("meta"):
        skeleton = LlavaModel.from_spec(spec, load_weights=False)
    assert all(p.is_meta for p in skeleton.parameters())
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {
        n: p.shape for n, p in loaded.named_parameters()
    }
    assert skeleton.image_token_id == loaded.image_token_id
