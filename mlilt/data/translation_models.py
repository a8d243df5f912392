"""Seq2seq translation models from transformers: which family, which language codes, how to
steer them.

Families, told apart by the config's ``model_type`` and the tokenizer's class:

* ``nllb`` (M2M100 architecture + ``NllbTokenizer``): FLORES-200 codes such as ``swh_Latn``;
  the source is set with ``tokenizer.src_lang``, the target with
  ``forced_bos_token_id = convert_tokens_to_ids("swh_Latn")``.
* ``m2m100``: two- or three-letter codes (``sw``, ``en``); ``tokenizer.src_lang`` and
  ``forced_bos_token_id = tokenizer.get_lang_id("sw")``.
* ``mbart50`` (``model_type`` mbart with language-code tokens): codes such as ``sw_KE``;
  ``tokenizer.src_lang`` and the target code's token as forced BOS.
* ``marian`` (OPUS-MT): one fixed direction (``opus-mt-en-sw``), no forced BOS. Models with
  several targets (``opus-mt-en-mul``) have ``>>swh<<`` tokens; the chosen one is put in
  front of every source sentence.

A language a user writes is resolved against the codes the tokenizer really has: the code as
written, then :data:`FLORES` (short ISO codes to FLORES-200, for NLLB; and back, for M2M100),
then a unique ``code_`` prefix (``sw`` -> ``sw_KE`` for mBART-50, ``swh`` -> ``swh_Latn``).
A code that resolves to nothing is an error naming it and a few valid codes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlilt.errors import MliltError, UsageError

# Short (ISO 639-1, or 639-3 where there is no short one) code -> FLORES-200 code, as NLLB-200
# spells it. Individual languages where ISO has a macrolanguage: sw -> swh (Kiswahili),
# ar -> arb (Modern Standard Arabic), fa -> pes, ms -> zsm, no -> nob, zh -> zho_Hans.
FLORES = {
    "af": "afr_Latn", "am": "amh_Ethi", "ar": "arb_Arab", "az": "azj_Latn", "be": "bel_Cyrl",
    "bg": "bul_Cyrl", "bn": "ben_Beng", "bs": "bos_Latn", "ca": "cat_Latn", "cs": "ces_Latn",
    "cy": "cym_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn",
    "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab", "fi": "fin_Latn",
    "fil": "tgl_Latn", "fr": "fra_Latn", "ga": "gle_Latn", "gl": "glg_Latn", "gu": "guj_Gujr",
    "ha": "hau_Latn", "he": "heb_Hebr", "hi": "hin_Deva", "hr": "hrv_Latn", "hu": "hun_Latn",
    "hy": "hye_Armn", "id": "ind_Latn", "ig": "ibo_Latn", "is": "isl_Latn", "it": "ita_Latn",
    "ja": "jpn_Jpan", "ka": "kat_Geor", "kk": "kaz_Cyrl", "km": "khm_Khmr", "kn": "kan_Knda",
    "ko": "kor_Hang", "ky": "kir_Cyrl", "lo": "lao_Laoo", "lt": "lit_Latn", "lv": "lvs_Latn",
    "mi": "mri_Latn", "mk": "mkd_Cyrl", "ml": "mal_Mlym", "mr": "mar_Deva", "ms": "zsm_Latn",
    "mt": "mlt_Latn", "my": "mya_Mymr", "ne": "npi_Deva", "nl": "nld_Latn", "no": "nob_Latn",
    "ny": "nya_Latn", "pa": "pan_Guru", "pl": "pol_Latn", "ps": "pbt_Arab", "pt": "por_Latn",
    "ro": "ron_Latn", "ru": "rus_Cyrl", "rw": "kin_Latn", "si": "sin_Sinh", "sk": "slk_Latn",
    "sl": "slv_Latn", "sn": "sna_Latn", "so": "som_Latn", "sr": "srp_Cyrl", "sv": "swe_Latn",
    "sw": "swh_Latn", "ta": "tam_Taml", "te": "tel_Telu", "tg": "tgk_Cyrl", "th": "tha_Thai",
    "tl": "tgl_Latn", "tr": "tur_Latn", "uk": "ukr_Cyrl", "ur": "urd_Arab", "uz": "uzn_Latn",
    "vi": "vie_Latn", "wo": "wol_Latn", "xh": "xho_Latn", "yo": "yor_Latn", "zh": "zho_Hans",
    "zu": "zul_Latn",
}
_SHORT = {flores: short for short, flores in FLORES.items() if short not in ("fil",)}
# ISO 639-3 macrolanguage codes OPUS-MT uses where FLORES names the individual language.
_MACRO = {"swh": "swa", "arb": "ara", "pes": "fas", "zsm": "msa", "nob": "nor", "npi": "nep",
          "lvs": "lav", "azj": "aze", "uzn": "uzb", "pbt": "pus", "zho": "cmn"}
_FLORES_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_MBART_CODE = re.compile(r"^[a-z]{2}_[A-Z]{2}$")
_MARIAN_TARGET = re.compile(r"^>>([^<>\s]+)<<$")
_OPUS_NAME = re.compile(r"opus-mt-(?:tc-[a-z]+-)?([a-zA-Z_]+)-([a-zA-Z_]+)$")
FAMILIES = ("nllb", "m2m100", "mbart50", "marian")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Direction:
    """How to make one model translate ``src`` -> ``tgt`` (codes as the user wrote them).

    ``src_code``/``tgt_code`` are the model's own codes (None where the model has no choice);
    ``forced_bos_token_id`` goes to ``generate``; ``prefix`` goes before every source text.
    """

    family: str
    src: str | None
    tgt: str
    src_code: str | None
    tgt_code: str | None
    forced_bos_token_id: int | None = None
    prefix: str = ""


def aliases(code: str) -> set[str]:
    """Every spelling of one language a model might use: sw, swh_Latn, swh, swa."""
    code = code.strip()
    found = {code, code.lower()}
    flores = FLORES.get(code.lower()) or (code if _FLORES_CODE.match(code) else None)
    if flores:
        found |= {flores, flores[:3]}
        found.add(_SHORT.get(flores, flores[:3]))
        found.add(_MACRO.get(flores[:3], flores[:3]))
    if len(code) == 3 and code.isalpha():  # a bare ISO 639-3 code: its short form, if listed
        short = next((s for f, s in _SHORT.items() if f[:3] == code.lower()), None)
        if short:
            found |= aliases(short)
    return found


def resolve_code(code: str, codes: Sequence[str], what: str, model: str) -> str:
    """``code`` as one of the model's ``codes``; UsageError naming it and some valid codes."""
    if not isinstance(code, str) or not code.strip():
        raise UsageError(f"{what} must be a language code, got {code!r}")
    code = code.strip()
    available = set(codes)
    candidates = [code, FLORES.get(code.lower()), _SHORT.get(code)]
    for candidate in candidates:
        if candidate and candidate in available:
            return candidate
    lowered = {item.lower(): item for item in codes}
    if code.lower() in lowered:
        return lowered[code.lower()]
    prefixed = sorted(item for item in codes if item.lower().startswith(code.lower() + "_"))
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        raise UsageError(f"{what} {code!r} is ambiguous for {model}: it could be {', '.join(prefixed)}; "
                         "give one of them")
    raise UsageError(f"{what} {code!r} is not a language of {model} ({len(codes)} codes, e.g. "
                     f"{_examples(codes)}); short ISO codes (sw, en) and the model's own codes both work")


def _examples(codes: Sequence[str], n: int = 8) -> str:
    preferred = [c for c in ("en", "eng_Latn", "en_XX", "sw", "swh_Latn", "sw_KE", "fr", "fra_Latn") if c in codes]
    rest = [c for c in sorted(codes) if c not in preferred]
    return ", ".join((preferred + rest)[:n])


# --------------------------------------------------------------------------- families


def family_of(model_type: str, tokenizer: Any, model: str) -> str:
    """One of :data:`FAMILIES`, from the config's ``model_type`` and the tokenizer class."""
    name = type(tokenizer).__name__
    if model_type == "marian":
        return "marian"
    if model_type == "m2m_100":
        return "nllb" if name.startswith("Nllb") else "m2m100"
    if model_type == "mbart" and language_codes(tokenizer, "mbart50"):
        return "mbart50"
    raise UsageError(f"{model} is a {model_type!r} model with {name}; translate supports NLLB-200, M2M100, "
                     "mBART-50 and Marian (OPUS-MT) models")


def language_codes(tokenizer: Any, family: str) -> list[str]:
    """The language codes a tokenizer knows (for Marian: its ``>>xx<<`` target tokens)."""
    if family == "m2m100":
        return list(getattr(tokenizer, "lang_code_to_id", {}) or {})
    vocab = tokenizer.get_vocab()
    if family == "marian":
        return sorted(match.group(1) for token in vocab if (match := _MARIAN_TARGET.match(token)))
    pattern = _FLORES_CODE if family == "nllb" else _MBART_CODE
    return sorted(token for token in vocab if pattern.match(token))


def direction(family: str, tokenizer: Any, model: str, src: str | None, tgt: str) -> Direction:
    """How to make this model translate ``src`` -> ``tgt``; UsageError before any work if it cannot."""
    if family == "marian":
        return _marian_direction(tokenizer, model, src, tgt)
    codes = language_codes(tokenizer, family)
    if src is None:
        raise UsageError(f"{model} is multilingual: give the source language with --src (e.g. --src en)")
    src_code = resolve_code(src, codes, "source language", model)
    tgt_code = resolve_code(tgt, codes, "target language", model)
    if family == "m2m100":
        bos = tokenizer.get_lang_id(tgt_code)
    else:
        bos = tokenizer.convert_tokens_to_ids(tgt_code)
    return Direction(family, src, tgt, src_code, tgt_code, forced_bos_token_id=int(bos))


def _marian_direction(tokenizer: Any, model: str, src: str | None, tgt: str) -> Direction:
    """Marian models translate one way; several targets need a ``>>code<<`` prefix."""
    model_src, model_tgt = _marian_languages(tokenizer, model)
    wrong_source = bool(src and model_src and not _same_language(src, model_src))
    targets = language_codes(tokenizer, "marian")
    if not wrong_source and targets:
        code = _resolve_marian_target(tgt, targets, model)
        return Direction("marian", src or model_src, tgt, model_src, code, prefix=f">>{code}<< ")
    if wrong_source or (model_tgt and not _same_language(tgt, model_tgt)):
        wanted = f"{src or model_src or '?'} -> {tgt}"
        raise UsageError(f"{model} translates {model_src or '?'} -> {model_tgt or '?'}, not {wanted}; pick the "
                         f"opus-mt model for that direction (e.g. Helsinki-NLP/opus-mt-{src or model_src}-{tgt})")
    return Direction("marian", src or model_src, tgt, model_src, model_tgt)


def _resolve_marian_target(tgt: str, targets: list[str], model: str) -> str:
    for candidate in sorted(aliases(tgt), key=lambda c: (c != tgt, len(c), c)):
        if candidate in targets:
            return candidate
    return resolve_code(tgt, targets, "target language", model)  # prefix match or the error


def _marian_languages(tokenizer: Any, model: str) -> tuple[str | None, str | None]:
    """(source, target) from the tokenizer config, else from an ``opus-mt-SRC-TGT`` name."""
    src = getattr(tokenizer, "source_lang", None)
    tgt = getattr(tokenizer, "target_lang", None)
    if not (src and tgt):
        match = _OPUS_NAME.search(Path(model.rstrip("/\\")).name)
        if match:
            src, tgt = src or match.group(1), tgt or match.group(2)
    multi = {"mul", "mul_Latn"}
    return (None if src in multi else src), (None if tgt in multi else tgt)


def _same_language(user: str, model_code: str) -> bool:
    """Whether a user's code names one of the languages behind a model's code (``en+fr`` ok)."""
    mine = aliases(user)
    return any(part in mine or part.lower() in mine for part in re.split(r"[+_]", model_code) if part) \
        or model_code in mine


# --------------------------------------------------------------------------- loading


def load_tokenizer(model: str) -> tuple[Any, str]:
    """(tokenizer, family) of a Hub name or a local folder, before any weights load."""
    from transformers import AutoConfig, AutoTokenizer

    _check_model_name(model)
    config = _guarded(model, lambda: AutoConfig.from_pretrained(model))
    tokenizer = _guarded(model, lambda: AutoTokenizer.from_pretrained(model))
    return tokenizer, family_of(getattr(config, "model_type", "?"), tokenizer, model)


def load_model(model: str, device: str, dtype: str):
    """The seq2seq model in eval mode on ``device``."""
    from transformers import AutoModelForSeq2SeqLM

    import transformers

    chosen = resolve_dtype(dtype, device)
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 calls it dtype; 4.x torch_dtype
        loaded = _guarded(model, lambda: AutoModelForSeq2SeqLM.from_pretrained(model, dtype=chosen))
    else:
        loaded = _guarded(model, lambda: AutoModelForSeq2SeqLM.from_pretrained(model, torch_dtype=chosen))
    return loaded.to(device).eval()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":  # bf16 on GPUs that have it: fp16 overflows in some OPUS-MT models
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise UsageError(f"--dtype must be auto, {', '.join(choices)}; got {dtype!r}")
    return choices[dtype]


def _check_model_name(model: str) -> None:
    if not isinstance(model, str) or not model.strip():
        raise UsageError(f"--model must be a Hub name or a folder, got {model!r}")
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local and not path.is_dir():
        raise UsageError(f"--model {model}: no such folder")


def _guarded(model: str, load):
    try:
        return load()
    except MliltError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # missing files, offline Hub, bad config
        raise UsageError(f"cannot load translation model {model} ({type(exc).__name__}: {exc})"[:800]) from None


# --------------------------------------------------------------------------- translating


class Translator:
    """One loaded model steered in one direction: ``translate(texts)`` -> texts."""

    def __init__(self, model, tokenizer, way: Direction, *, num_beams: int, max_length: int):
        self.model, self.tokenizer, self.way = model, tokenizer, way
        self.num_beams, self.max_length = num_beams, max_length
        self.language_ids = _language_ids(tokenizer, way.family)

    def translate(self, texts: Sequence[str]) -> list[str]:
        import torch

        if not texts:
            return []
        if self.way.src_code is not None and self.way.family != "marian":
            self.tokenizer.src_lang = self.way.src_code  # sets the source-language prefix token
        inputs = self.tokenizer([self.way.prefix + text for text in texts], return_tensors="pt",
                                padding=True, truncation=True)
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        extra = {}
        if self.way.forced_bos_token_id is not None:
            extra["forced_bos_token_id"] = self.way.forced_bos_token_id
        with torch.inference_mode():
            output = self.model.generate(**inputs, num_beams=self.num_beams, max_new_tokens=self.max_length,
                                         do_sample=False, **extra)
        # Language tokens are not "special" in every tokenizer version: drop them by id.
        rows = [[token for token in row if token not in self.language_ids] for row in output.tolist()]
        decoded = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [" ".join(text.split()) for text in decoded]


def _language_ids(tokenizer: Any, family: str) -> set[int]:
    """Ids of the tokenizer's language tokens (``__sw__``, ``swh_Latn``, ``>>swh<<``)."""
    codes = language_codes(tokenizer, family)
    if family == "m2m100":
        ids = tokenizer.lang_code_to_id.values()
    elif family == "marian":
        ids = tokenizer.convert_tokens_to_ids([f">>{code}<<" for code in codes])
    else:
        ids = tokenizer.convert_tokens_to_ids(codes)
    return {int(i) for i in ids if i is not None}
