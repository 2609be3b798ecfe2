"""BLIP for visual question answering (Li et al., "BLIP: Bootstrapping Language-Image Pre-training for Unified
Vision-Language Understanding and Generation", ICML 2022, arXiv 2201.12086) through transformers'
``BlipForQuestionAnswering``, frozen, with LoRA (arXiv 2106.09685) on its attention.

BLIP answers a question in three steps: the ViT image encoder (``vision_model``) embeds the image; the question
encoder (``text_encoder``, a BERT whose layers cross-attend to the image tokens) embeds the question grounded in the
image; the answer decoder (``text_decoder``, a causal BERT cross-attending to the question encoder's states)
generates the answer. fedhb splits it in two:

- :class:`BlipVQAEncoder`, the client model's one encoder (no fusion step): image and question encoders, LoRA on the
  attention projections of both (the question encoder's self- and cross-attention ``query``/``value``, the ViT's fused
  ``qkv``: ``--model.lora.target_modules`` ``query``/``key``/``value`` also select ``qkv`` in the ViT, ``output``
  its ``projection``). Its features are the question encoder's ``[CLS]`` state, on which Med-MMFL (arXiv 2602.04416)
  classifies yes/no questions.
- :class:`AnswerDecoder`, the answer decoder with its own LoRA, which the VQA task (:mod:`fedhb.tasks.vqa`) makes the
  client model's ``head`` for open-ended answers: personalised methods (FedPer, FedRep, ...) then keep or train the
  decoder's adapters as the head.

``--model.backbone`` is ``Salesforce/blip-vqa-base`` (a hub id) or a local folder holding it (``config.json``, weights,
and the processor files read by ``BlipProcessor``), or the preset ``tiny-blip``: random-init BLIP classes (hidden 32,
2 layers, 32-px images in 8-px patches) with a WordPiece tokenizer built in code, for tests and ``--fast_dev_run``.

Images are prepared once per run: each distinct image is resized to the ViT's input size and kept once as uint8 (a
PathVQA image serves about six questions; EHRXQA's MIMIC-CXR images are memory-mapped from fedhb's on-disk image
cache), and batches look their images up by index.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedhb.models.base import Encoder, load_pretrained, presets

if TYPE_CHECKING:
    from fedhb.config import LoRAArgs, ModelArgs
    from fedhb.data.base import Samples

TINY_BLIP = "tiny-blip"
#: Random-init configs of the real classes (``BlipConfig``'s text and vision parts); vocab and special token ids come
#: from the tokenizer built in code.
BLIP_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    TINY_BLIP: {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8, initializer_range=0.02),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=128),
    },
}
#: BLIP's image normalisation (the OpenAI CLIP statistics its processor uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The name of the BLIP encoder among the client model's encoders (``encoders.vqa.*``).
ENCODER_NAME = "vqa"

# Whole-word tokens of the tiny vocabulary beyond fedhb.models.text's: questions and answers of the fixtures become
# a few tokens each; any other word still tokenizes, character by character.
_VQA_WORDS = """
yes what where how many which who whom why when show shows shown seen image images present there does this picture
type kind organ part region side view contain contains containing appear appears appearing x-ray xray study
lobe lower fibrosis mesothelioma anatomical locations location anomaly bright list given admitted hospital times
""".split()


def tiny_blip_tokenizer() -> Any:
    """A WordPiece ``BertTokenizer`` (lower-cased) over characters, ``##``-continuations and common words, with BLIP's
    decoder start token ``[DEC]`` as its ``bos_token``."""
    from transformers import BertTokenizer

    from fedhb.models.text import _CHARS, _WORDS

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *_CHARS, *(f"##{c}" for c in _CHARS)]
    tokens += [w for w in dict.fromkeys(_WORDS + _VQA_WORDS) if w not in tokens]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, bos_token="[DEC]")


#: The ViT's names for the generic targets: its attention has one fused ``qkv`` projection and a ``projection`` output.
_VISION_TARGETS = {"query": "qkv", "key": "qkv", "value": "qkv", "output": "projection"}


def _resolved(module: nn.Module, targets: list[str]) -> list[str]:
    """Those of ``targets`` that name linear modules of ``module`` (resolved through
    :data:`fedhb.models.lora.ALIASES`)."""
    from fedhb.models.lora import resolve_target_modules

    found: list[str] = []
    for target in targets:
        try:
            found += resolve_target_modules(module, [target])
        except ValueError:
            continue
    return list(dict.fromkeys(found))


def _check_targets(blip: Any, targets: list[str]) -> None:
    """Every target names a linear module of the question encoder or (as :data:`_VISION_TARGETS` maps it) the ViT."""
    unknown = [t for t in targets if not _resolved(blip.text_encoder, [t])
               and not _resolved(blip.vision_model, [_VISION_TARGETS.get(t, t)])]
    if unknown:
        raise ValueError(f"--model.lora.target_modules: BLIP's encoders have no linear module named {unknown}; use "
                         f"query, key, value (the ViT's fused qkv) or output (its projection)")


def _lora_part(module: nn.Module, args: LoRAArgs, targets: list[str]) -> nn.Module:
    """``module`` frozen, with LoRA on those of ``targets`` it has (none of them: frozen only)."""
    from fedhb.models.lora import apply_lora

    found = _resolved(module, targets)
    if not found:
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    return apply_lora(module, dataclasses.replace(args, target_modules=list(dict.fromkeys(found))))


class QuestionEncoder(nn.Module):
    """BLIP's image encoder and question encoder: the question's hidden states, cross-attending to the image."""

    def __init__(self, vision_model: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.text_encoder = text_encoder

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 encoder_attention_mask=image_mask).last_hidden_state


class BlipVQAEncoder(Encoder):
    """Image + question -> the question encoder's states; features are its ``[CLS]`` state.

    Args:
        model: The :class:`QuestionEncoder` (LoRA injected).
        tokenizer: BLIP's tokenizer (a BERT WordPiece one with ``[DEC]`` as ``bos_token``).
        image_size: The ViT's input size.
        max_length: Question tokens (``--model.max_length``), special tokens included; longer questions are truncated.
        mean: Per-channel normalisation mean of the pixels (0..1).
        std: Per-channel normalisation std.
        answer_length: Answer tokens (decoder start and ``[SEP]`` included) prepared as ``answer_ids`` for the
            answer decoder; 0: no answers prepared (yes/no classification).
        bos_token_id: The answer decoder's start token (``[DEC]``), which replaces an answer's ``[CLS]``.
        name: The backbone, for messages.
    """

    def __init__(self, model: QuestionEncoder, tokenizer: Any, image_size: int, max_length: int,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD, answer_length: int = 0,
                 bos_token_id: int = 0, name: str = "blip") -> None:
        super().__init__()
        config: Any = model.text_encoder.config
        limit = int(config.max_position_embeddings)
        if max_length > limit:
            raise ValueError(f"--model.max_length {max_length} is more than the {limit} positions {name} has; "
                             f"set --model.max_length <= {limit}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_size, self.max_length, self.answer_length = int(image_size), int(max_length), int(answer_length)
        self.bos_token_id = int(bos_token_id)
        self.name = name
        self.hidden_size = int(config.hidden_size)
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # Each distinct image once, (M, 3, S, S) uint8 on the host (or memory-mapped from the image cache); batches
        # carry indices into it.
        self.images = torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        """Tokenize every question (and answer), resize every distinct image once."""
        from fedhb.data.pathvqa import VQAInputs

        inputs = samples.inputs
        if not isinstance(inputs, VQAInputs):
            raise TypeError(f"BLIP needs VQA samples (fedhb.data.pathvqa.VQAInputs), got {type(inputs).__name__}")
        pixels, index = inputs.pixels(self.image_size)
        self.images = torch.from_numpy(pixels)  # a memmap stays one: batches read their own rows
        questions = self.tokenizer(inputs.questions, max_length=self.max_length, padding="max_length",
                                   truncation=True, return_tensors="np")
        out = {"image_index": torch.from_numpy(index.astype(np.int64)),
               "input_ids": torch.from_numpy(questions["input_ids"].astype(np.int32)),
               "attention_mask": torch.from_numpy(questions["attention_mask"].astype(np.int8))}
        if self.answer_length:
            out["answer_ids"] = torch.from_numpy(self.answer_ids(inputs.answers))
        return out

    def answer_ids(self, answers: list[str]) -> np.ndarray:
        """``(N, answer_length)`` int32: ``[DEC] answer [SEP]`` and padding (BLIP's answer format: the tokenizer's
        ``[CLS]`` replaced by the decoder start token)."""
        import warnings

        encoded = self.tokenizer(answers, max_length=self.answer_length, padding="max_length", truncation=True,
                                 return_tensors="np")
        ids = encoded["input_ids"].astype(np.int32)
        full = self.tokenizer(answers, truncation=False)["input_ids"]
        longer = sum(len(a) > self.answer_length for a in full)
        if longer:
            warnings.warn(f"{longer} of {len(answers)} answers are longer than --data.answer_length "
                          f"{self.answer_length} tokens; they are truncated (as training targets and as references)",
                          stacklevel=2)
        ids[:, 0] = self.bos_token_id
        return ids

    def pixel_values(self, index: Tensor, device: torch.device) -> Tensor:
        x = self.images[index.cpu().long()].to(device).float().div_(255.0)
        return (x - self.mean.to(device)) / self.std.to(device)

    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The question encoder's states ``(B, T, H)`` and their attention mask ``(B, T)``."""
        mask = batch["attention_mask"]
        # Padding is at the end: columns past the longest question of the batch change no real token's state.
        width = max(1, int(mask.sum(1).max()))
        mask = mask[:, :width].long()
        pixels = self.pixel_values(batch["image_index"], mask.device)
        states = self.model(pixel_values=pixels, input_ids=batch["input_ids"][:, :width].long(), attention_mask=mask)
        return states, mask

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encode(batch)[0][:, 0]


class AnswerDecoder(nn.Module):
    """BLIP's answer decoder (LoRA injected): teacher-forced logits for training, greedy answers for evaluation.

    Args:
        decoder: The ``BlipTextLMHeadModel``.
        bos_token_id: The decoder start token (``[DEC]``).
        sep_token_id: The end of an answer (``[SEP]``).
        pad_token_id: Padding.
        answer_length: Tokens of a generated answer, start and end included.
    """

    def __init__(self, decoder: nn.Module, bos_token_id: int, sep_token_id: int, pad_token_id: int,
                 answer_length: int) -> None:
        super().__init__()
        self.decoder = decoder
        self.bos, self.sep, self.pad = int(bos_token_id), int(sep_token_id), int(pad_token_id)
        self.answer_length = int(answer_length)
        self.out_features = 0  # what an empty prediction's width is (fedhb.loop.FederatedLoop.predict)

    def forward(self, states: Tensor, mask: Tensor, answer_ids: Tensor) -> Tensor:
        """Next-token logits ``(B, L - 1, vocab)`` of the answers ``answer_ids`` (cut to the longest of the batch)."""
        ids = answer_ids.long()
        width = max(2, int((ids != self.pad).sum(1).max()))
        ids = ids[:, :width]
        out = self.decoder(input_ids=ids, attention_mask=(ids != self.pad).long(), encoder_hidden_states=states,
                           encoder_attention_mask=mask)
        return out.logits[:, :-1]

    @torch.no_grad()
    def generate(self, states: Tensor, mask: Tensor) -> Tensor:
        """Greedy answers ``(B, answer_length)`` (``[DEC] ... [SEP]`` then padding), as token ids."""
        batch = states.shape[0]
        ids = torch.full((batch, 1), self.bos, dtype=torch.long, device=states.device)
        done = torch.zeros(batch, dtype=torch.bool, device=states.device)
        for _ in range(self.answer_length - 1):
            out = self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=states,
                               encoder_attention_mask=mask, logits_to_keep=1)
            step = out.logits[:, -1].argmax(-1)
            step = torch.where(done, torch.full_like(step, self.pad), step)
            ids = torch.cat([ids, step[:, None]], 1)
            done |= step == self.sep
            if bool(done.all()):
                break
        return F.pad(ids, (0, self.answer_length - ids.shape[1]), value=self.pad)


@dataclasses.dataclass
class BlipParts:
    """What :func:`build_blip` returns: the client model's encoder and, for open answers, the answer decoder."""

    encoder: BlipVQAEncoder
    decoder: AnswerDecoder | None
    tokenizer: Any


def build_blip(args: ModelArgs, answer_length: int = 0) -> BlipParts:
    """BLIP from ``args.backbone`` (``tiny-blip``, a hub id or a local folder) with LoRA per ``args.lora``; the answer
    decoder (with its own LoRA) too when ``answer_length`` > 0 (open-ended answers)."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    backbone = args.backbone
    others = [n for names in presets().values() for n in names]
    if backbone in others and not Path(backbone).expanduser().exists():
        raise ValueError(f"--model.backbone {backbone!r} is not a BLIP: VQA needs {TINY_BLIP}, "
                         f"Salesforce/blip-vqa-base or a local folder holding it")
    if backbone in BLIP_PRESETS:
        tokenizer = tiny_blip_tokenizer()
        preset = BLIP_PRESETS[backbone]
        text = dict(preset["text"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                    eos_token_id=tokenizer.sep_token_id)
        blip: Any = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=dict(preset["vision"])))
        mean, std = CLIP_MEAN, CLIP_STD
    else:
        from transformers import BlipProcessor

        processor = load_pretrained(BlipProcessor, backbone)
        tokenizer = processor.tokenizer
        blip = load_pretrained(BlipForQuestionAnswering, backbone)
        mean, std = tuple(processor.image_processor.image_mean), tuple(processor.image_processor.image_std)
    blip.eval()
    vision_size = blip.config.vision_config.image_size
    size = vision_size if isinstance(vision_size, int) else vision_size[0]
    targets = list(args.lora.target_modules)
    _check_targets(blip, targets)
    vision = _lora_part(blip.vision_model, args.lora, list(dict.fromkeys(_VISION_TARGETS.get(t, t) for t in targets)))
    question = _lora_part(blip.text_encoder, args.lora, targets)
    name = backbone if backbone in BLIP_PRESETS else (Path(backbone).name or backbone)
    config = blip.config.text_config  # BLIP starts answers with its bos token ([DEC]) and ends them with [SEP]
    encoder = BlipVQAEncoder(QuestionEncoder(vision, question), tokenizer, size, args.max_length, mean, std,
                             answer_length, config.bos_token_id, name=name)
    decoder = None
    if answer_length:
        lm = _lora_part(blip.text_decoder, args.lora, targets)
        decoder = AnswerDecoder(lm, config.bos_token_id, config.sep_token_id, config.pad_token_id, answer_length)
    return BlipParts(encoder, decoder, tokenizer)
