"""Tiny random vision-language models of each family, built from configs and saved like real ones (no downloads).

Each builder writes a folder that ``AutoProcessor`` / ``AutoModelForImageTextToText`` load as they would a hub
snapshot: a byte-level BPE tokenizer trained here with the ``tokenizers`` library on a few sentences (the
family's special tokens added), a small image processor (the PIL backend: no torchvision here), the family's
chat template in miniature, and a 1-layer model with 32-wide hidden states
(weights drawn wide enough that the answer depends on the picture). Qwen2.5-VL, Qwen3-VL and SmolVLM
processors also need a video processor, which transformers builds only with torchvision: ``needs_torchvision``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
SIDE = 32  # every tiny image processor resizes to 32 px

_CORPUS = ["a photo of a red cat sitting on the blue mat", "a painting of a green tree in watercolor",
           "describe the image in one paragraph: subject, style and medium"] * 4


def tiny_tokenizer(specials, *, bos=None, eos=None, pad=None, unk=None, extra=None, vocab_size=320):
    """A PreTrainedTokenizerFast over a byte-level BPE trained on _CORPUS; specials get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, extra_special_tokens=extra or {})


def _chat_template(start: str, end: str, image: str, assistant: str, bos: str = "") -> str:
    """A family's chat template in miniature: user turns with images and text, then the assistant's cue."""
    return (bos + "{% for message in messages %}" + start + "{% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for c in message['content'] %}"
            "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}" + end + "{% endfor %}{% if add_generation_prompt %}" + assistant
            + "{% endif %}")


def _save(model, processor, path: Path, seed: int = 0, **generation) -> Path:
    """Save like a hub snapshot. The weights are redrawn with a large spread first: a 32-wide model at the usual
    0.02 says the same token whatever the picture, at 0.5 its (garbage) answer depends on the picture."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    for k, v in generation.items():
        setattr(model.generation_config, k, v)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_florence2(path: Path, seed: int = 0) -> Path:
    """Florence2ForConditionalGeneration: a 2-stage DaViT (16 image tokens + 1) and a 1+1-layer BART."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", extra={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"height": SIDE, "width": SIDE}, do_center_crop=False)
    ip.image_seq_length = (SIDE // 8) ** 2 + 1  # last stage 4x4 plus the pooled token
    cfg = Florence2Config(
        vision_config=dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                           patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(2, 2), num_groups=(2, 2),
                           window_size=2, projection_dim=32, max_position_embeddings=16, max_temporal_embeddings=4),
        text_config=dict(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                         max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2, forced_eos_token_id=2),
        image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _save(Florence2ForConditionalGeneration(cfg), Florence2Processor(image_processor=ip, tokenizer=tok), path,
                 seed)


LLAVA_TEMPLATE = _chat_template("<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n", "<|eot_id|>",
                                "<image>\n", "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                bos="{{ bos_token }}")


def build_llava(path: Path, seed: int = 1, *, chat_template: str | None = LLAVA_TEMPLATE,
                resize: bool = True) -> Path:
    """LlavaForConditionalGeneration (CLIP vision tower, Llama text model), the JoyCaption layout.
    ``resize=False`` makes a fixed-resolution model that cannot read pictures of another size."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    specials = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<image>"]
    tok = tiny_tokenizer(specials, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    ip = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                               do_resize=resize, do_center_crop=resize)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=chat_template, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, image_size=SIDE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=ids["<|begin_of_text|>"],
                         eos_token_id=ids["<|eot_id|>"], pad_token_id=ids["<|finetune_right_pad_id|>"]),
        image_token_id=ids["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default")
    return _save(LlavaForConditionalGeneration(cfg), proc, path, seed, eos_token_id=ids["<|eot_id|>"],
                 pad_token_id=ids["<|finetune_right_pad_id|>"])


IDEFICS3_TEMPLATE = _chat_template("{{ message['role'] | capitalize }}:", "<end_of_utterance>\n", "<image>",
                                   "Assistant:", bos="<|im_start|>")


def build_idefics3(path: Path, seed: int = 0) -> Path:
    """Idefics3ForConditionalGeneration (SmolVLM-Instruct's class): SigLIP-style vision, pixel shuffle, Llama."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = (["<|pad|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                 "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
    tok = tiny_tokenizer(specials, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|pad|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    ip = Idefics3ImageProcessorPil(size={"longest_edge": SIDE}, max_image_size={"longest_edge": SIDE},
                                   do_image_splitting=False)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, chat_template=IDEFICS3_TEMPLATE,
                             image_seq_len=(SIDE // 8) ** 2 // 4)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIDE, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|pad|>"]),
        image_token_id=ids["<image>"], scale_factor=2, pad_token_id=ids["<|pad|>"])
    return _save(Idefics3ForConditionalGeneration(cfg), proc, path, seed, eos_token_id=ids["<end_of_utterance>"],
                 pad_token_id=ids["<|pad|>"])


QWEN_TEMPLATE = _chat_template("<|im_start|>{{ message['role'] }}\n", "<|im_end|>\n",
                               "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n")
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def build_qwen_vl(path: Path, seed: int = 0, *, version: str = "2.5") -> Path:
    """Qwen2.5-VL or Qwen3-VL (``version="3"``): 14-px patches merged 2x2, a 1-layer Qwen text model.
    Needs torchvision (transformers builds the Qwen video processor only with it)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tiny_tokenizer(_QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in _QWEN_SPECIALS}
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"])
    if version == "3":
        cfg = transformers.Qwen3VLConfig(
            text_config=dict(text, head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               num_position_embeddings=16, deepstack_visual_indexes=[0]),
            vision_end_token_id=ids["<|vision_end|>"], **tokens)
        model_cls, proc_cls, video_cls = (transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLProcessor,
                                          transformers.Qwen3VLVideoProcessor)
    else:
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=dict(text, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[0]),
            **tokens)
        model_cls, proc_cls, video_cls = (transformers.Qwen2_5_VLForConditionalGeneration,
                                          transformers.Qwen2_5_VLProcessor, transformers.Qwen2VLVideoProcessor)
    proc = proc_cls(image_processor=ip, tokenizer=tok, video_processor=video_cls(), chat_template=QWEN_TEMPLATE)
    return _save(model_cls(cfg), proc, path, seed, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


#: family -> (builder, needs torchvision, the image token the prompt must carry)
FAMILIES = {
    "llava": (build_llava, False, "<image>"),
    "idefics3": (build_idefics3, False, "<image>"),
    "qwen2_5_vl": (build_qwen_vl, True, "<|image_pad|>"),
    "qwen3_vl": (lambda p, seed=0: build_qwen_vl(p, seed, version="3"), True, "<|image_pad|>"),
}
