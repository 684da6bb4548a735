"""GGUF files as a model source: each `.gguf` is converted once into a cached Hugging Face folder.

bitsandbytes quantizes dense weights, and a GGUF holds llama.cpp-quantized ones (Q4_1, Q8_0, ...):
transformers dequantizes them (`GgufConfig(dequantize=True)`), and we save the dense model beside
its tokenizer (chat template included) in the cache, keyed by the file's SHA-256. Every later run
with the same file loads that folder in NF4 like any other base, without re-reading the GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from train.errors import UserError
from train.tiny import cache_root

log = logging.getLogger("train")

CACHE_VERSION = "v1"  # bump when the conversion below changes what it writes
COMPLETE = ".complete"  # written last: a folder without it is a conversion that was cut short


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, computed once per process for one version of the file (its path, size and mtime)."""
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime_ns, chunk)


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_folder(path: Path) -> Path:
    """Where the conversion of this exact file lives (name for humans, hash for identity)."""
    return cache_root() / "gguf" / f"{path.stem}-{file_sha256(path)[:16]}-{CACHE_VERSION}"


def check_readable(path: Path) -> str:
    """The file's architecture; a one-line UserError naming the file when it is not a usable GGUF."""
    where = f"model.name_or_path: {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file; give the path to a .gguf file (scripts/demo.sh fetches SmolLM2's)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError(f"{where}: reading GGUF files needs the `gguf` package; pip install gguf") from None
    try:
        reader = GGUFReader(path)
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except (ValueError, OSError, IndexError, KeyError) as e:  # gguf raises ValueError on a bad magic/version
        raise UserError(f"{where}: not a readable GGUF file ({str(e).splitlines()[0]}); "
                        "re-download it or convert the model with llama.cpp's convert_hf_to_gguf.py") from None
    if not arch:
        raise UserError(f"{where}: the GGUF has no general.architecture field, so no model class fits it")
    if "tokenizer.ggml.model" not in reader.fields:
        raise UserError(f"{where}: the GGUF carries no tokenizer (tokenizer.ggml.*); training needs one")
    return str(arch)


def resolve(name: str) -> Path:
    """The cached HF folder for GGUF file `name`, converting it first when this file was never seen.

    Under a distributed launch the first call converts on each machine's main process while the other ranks
    wait (accelerate's local_main_process_first), so no rank replaces a folder another one is reading; every
    process's first call for a file must therefore come at the same point (fit's first step), later ones
    return at once."""
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        check_readable(path)  # the one-line error for a missing file
    st = path.stat()
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _RESOLVED or not (_RESOLVED[key] / COMPLETE).is_file():
        with local_main_first():
            _RESOLVED[key] = convert_once(path)
    return _RESOLVED[key]


_RESOLVED: dict[tuple, Path] = {}  # (path, size, mtime) -> its folder: one resolve (and one barrier) per process


def local_main_first():
    """accelerate's local_main_process_first under a multi-process launch, else nothing to wait for."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).local_main_process_first()  # as fit's distributed_state


def convert_once(path: Path) -> Path:
    target = cached_folder(path)
    if (target / COMPLETE).is_file():  # this exact file (its SHA-256) was read and converted before
        return target
    arch = check_readable(path)  # parsing every field (a 49k-token vocabulary) takes ~10 s: only before converting
    log.info("converting %s (%s) to a Hugging Face folder, once: %s", path.name, arch, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        convert(path, tmp, arch)
        (tmp / COMPLETE).write_text(f"{path}\n", encoding="utf-8")
        if target.exists():  # a leftover without COMPLETE (a killed conversion): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a kill mid-conversion never leaves a folder that looks finished
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(path: Path, dest: Path, arch: str) -> None:
    """Dequantize the GGUF into a dense bf16 model and save it with its tokenizer into `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    folder, name = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, use_kernels=False,  # a conversion needs no hub kernels
            quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    except (ValueError, KeyError, NotImplementedError) as e:  # transformers: unsupported arch or quant type
        raise UserError(f"model.name_or_path: {path}: transformers cannot load this GGUF ({arch}): "
                        f"{str(e).splitlines()[0]}; use a GGUF of a supported architecture or the HF model folder") from None
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


# GGUF value types (the spec's gguf_type) and the byte size of each fixed-size one
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def string_field(path: str, key: str) -> str | None:
    """One string metadata value of a GGUF file, or None where it has none. Our own reader because gguf's
    GGUFReader parses every field first (a 49k-token vocabulary and its merges: ~7 s on 2 cores); this one skips
    arrays by their lengths and stops at the key (milliseconds)."""
    import struct

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return None
        _version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))

        def string() -> bytes:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n)

        def skip(kind: int, count: int = 1) -> None:
            if kind == _STRING:
                for _ in range(count):
                    (n,) = struct.unpack("<Q", f.read(8))
                    f.seek(n, 1)
            elif kind == _ARRAY:
                for _ in range(count):
                    inner, n = struct.unpack("<IQ", f.read(12))
                    skip(inner, n)
            else:
                f.seek(_SIZES[kind] * count, 1)

        for _ in range(n_kv):
            name = string().decode("utf-8")
            (kind,) = struct.unpack("<I", f.read(4))
            if name == key:
                return string().decode("utf-8") if kind == _STRING else None
            skip(kind)
    return None
