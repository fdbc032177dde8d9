"""Params-only exports: params + config + tokenizer, without the optimizer state, for evaluate,
sample, chat and serve, and for fine-tuning (`train.init_from`): written, found and read back here
(runs.py loads a whole model from one; `python -m jaxgpt.export RUN_DIR OUT` writes one from a run).

An export directory holds `config.json`, `params/` (orbax), `checksums.json` (one per param, checked
as they are read back) and the tokenizer files; a run writes one to `export/` when it finishes. A
converted GGUF's may keep quantized matrices (model/quant.py's layouts: from_gguf.keep_quantized).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxgpt import config as config_lib
from jaxgpt import files
from jaxgpt.data import prepare
from jaxgpt.data.tokenizer import Tokenizer
from jaxgpt.errors import CheckpointError
from jaxgpt.model import quant
from jaxgpt.model.gpt import GPT
from jaxgpt.parallel import sharding
from jaxgpt.store import checkpoint, integrity

EXPORT_CHECKSUMS = "checksums.json"  # beside an export's params/: {leaf path: checksum}
# in an export of LoRA adapters alone (export.lora=separate): {"base": the model they adapt}
LORA_NOTE = "lora.json"


def export(out_dir: str | Path, cfg: config_lib.Config, params, tokenizer: Tokenizer | None,
           extra: dict[str, str | bytes] | None = None) -> Path:
    """Write params + config + tokenizer (None: a converted model without one, see hf/convert.py)
    and the `extra` files (relative path -> content); a finished export replaces an older one
    whole."""
    out_dir = Path(out_dir).absolute()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    options = {}
    # one process exports host params alone: orbax must not wait for the others
    if jax.process_count() > 1:
        me = jax.process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me})
    checkpointer = ocp.StandardCheckpointer(**options)
    checkpointer.save(tmp / "params", params)
    checkpointer.wait_until_finished()
    files.atomic_write(tmp / "config.json", cfg.to_json())
    # read back against these (runs.load): a damaged export is refused, not loaded with
    # wrong weights
    files.atomic_write(tmp / EXPORT_CHECKSUMS,
                       json.dumps(integrity.checksums_and_finite(params)[0]))
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, content in (extra or {}).items():
        files.atomic_write(tmp / name, content)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def find(source: str | Path) -> Path | None:
    """The export directory `source` is, or holds as export/; None when neither."""
    source = Path(source)
    for candidate in (source, source / "export"):
        if (candidate / "params").is_dir() and (candidate / "config.json").is_file():
            return candidate.absolute()
    return None


def read_params(export_dir: Path, model: GPT, shardings=None, abstract=None) -> dict:
    """An export's params, placed by `shardings` (one device when None): each leaf's shape checked
    against the model's before any is read, each leaf's checksum after (an export written before
    exports carried checksums is read unchecked). A damaged export raises integrity.Damaged."""
    stored = integrity.guarded_read(
        "params metadata", lambda: ocp.StandardCheckpointer().metadata(export_dir / "params"))
    stored = getattr(stored, "item_metadata", stored)
    have = integrity.leaf_shapes(stored)
    if abstract is None and any(key.endswith("_scale") for key in have):
        return _read_quantized(export_dir, model, shardings, stored)
    target = checkpoint.params_target(model, shardings, abstract)
    want = integrity.leaf_shapes(target)
    for key in sorted(have.keys() | want.keys()):  # the paths the checksums name too
        if have.get(key) != want.get(key):
            raise CheckpointError(f"{export_dir}: param {key} is {have.get(key)} in the checkpoint "
                                  f"but {want.get(key)} in the model config")
    return _restore(export_dir, target)


def _restore(export_dir: Path, target) -> dict:
    tree = integrity.guarded_read(
        "params", lambda: ocp.StandardCheckpointer().restore(export_dir / "params", target))
    sums_file = export_dir / EXPORT_CHECKSUMS
    if sums_file.is_file():
        stamp, files_now = _verified_stamp(export_dir)
        if _read_text(stamp) != files_now:
            expected = integrity.guarded_read(EXPORT_CHECKSUMS,
                                              lambda: json.loads(sums_file.read_text()))
            integrity.verify_checksums(tree, expected)
            with contextlib.suppress(OSError):  # a read-only cache: verified again next time
                files.atomic_write(stamp, files_now)
    return tree


def _verified_stamp(export_dir: Path) -> tuple[Path, str]:
    """(the file in the cache saying an export passed its checksums, what it says: the name, size,
    modification and change times and inode of each of its params' files). Checksumming 500 MB
    is seconds at every start; an export whose files are as they were when they last passed is
    not checked again, one written, copied or touched since is."""
    entries = []
    for path in sorted([*(export_dir / "params").rglob("*"), export_dir / EXPORT_CHECKSUMS]):
        if path.is_file():
            st = path.stat()
            entries.append([str(path.relative_to(export_dir)), st.st_size, st.st_mtime_ns,
                            st.st_ctime_ns, st.st_ino])
    name = hashlib.sha256(str(export_dir.resolve()).encode()).hexdigest()[:32]
    return prepare.CACHE / "verified" / name, json.dumps(entries)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_quantized(export_dir: Path, model: GPT, shardings, stored) -> dict:
    """An export that keeps quantized matrices (from-gguf's keep_quantized): read as stored, on
    one device, for a model.weights other than float; else as the fp32 params (placed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    kept = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        getattr(stored, "tree", stored))
    floats = jax.eval_shape(lambda t: quant.float_params(t, shapes), kept)
    have, want = integrity.leaf_shapes(floats), integrity.leaf_shapes(shapes)
    for key in sorted(have.keys() | want.keys()):
        if have.get(key) != want.get(key):
            raise CheckpointError(f"{export_dir}: param {key} is {have.get(key)} in the export "
                                  f"(dequantized) but {want.get(key)} in the model config")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = _restore(export_dir, sharding.placed(kept, jax.tree.map(lambda _: one, kept)))
    if model.cfg.weights != "float":
        return tree
    tree = quant.float_params(tree, shapes)
    return tree if shardings is None else jax.device_put(tree, shardings)
