"""Writing model packages: the toolchain's edits to ``manifest.toml``.

Each toolchain step (export, quantise, training) changes a few keys of a manifest a person wrote
and commented; the edits here replace only those lines and the ``[hashes]`` table, keep every
other line and comment, and the result is loaded back with :func:`appliance.manifest.load_package`
so a step never leaves a manifest the node would refuse.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
import tomllib
from pathlib import Path

from appliance.manifest import ManifestError, ModelPackage, file_sha256, load_package
from appliance.uids import derived_uid


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for the characters we write
    raise TypeError(f"cannot write {value!r} into a manifest")


def _table_span(text: str, table: str) -> tuple[int, int] | None:
    """(start of the first key line, end) of ``[table]``; the end is the next header or the end."""
    header = re.search(rf"(?m)^\[{re.escape(table)}\][ \t]*(#.*)?$", text)
    if not header:
        return None
    start = header.end() + 1 if header.end() < len(text) else header.end()
    following = re.search(r"(?m)^\[", text[start:])
    return start, start + following.start() if following else len(text)


def set_keys(text: str, table: str, values: dict[str, object], comments: dict[str, str] | None = None) -> str:
    """Set ``key = value`` lines in ``[table]`` (created at the end when missing); a line that
    exists is replaced in place, with ``comments[key]`` as its trailing comment when given."""
    comments = comments or {}
    span = _table_span(text, table)
    if span is None:
        text = text.rstrip("\n") + f"\n\n[{table}]\n"
        span = (len(text), len(text))
    start, end = span
    body = text[start:end]
    for key, value in values.items():
        line = f"{key} = {_toml_value(value)}" + (f"   # {comments[key]}" if key in comments else "")
        pattern = rf'(?m)^{re.escape(key)}[ \t]*=.*$'
        if re.search(pattern, body):
            body = re.sub(pattern, lambda _: line, body, count=1)
        else:
            # After the table's last key line, before any blank lines that separate it from the next.
            stripped = body.rstrip("\n")
            body = stripped + ("\n" if stripped else "") + line + "\n" + body[len(stripped):].lstrip("\n")
            if end < len(text) and not body.endswith("\n\n"):
                body += "\n"
    return text[:start] + body + text[end:]


def delete_keys(text: str, table: str, keys: list[str]) -> str:
    """Remove the ``key = value`` lines of ``keys`` from ``[table]`` (a key that is not there is
    no error): a source that changes kind (factory to program) must not leave the old one behind."""
    span = _table_span(text, table)
    if span is None:
        return text
    start, end = span
    body = text[start:end]
    for key in keys:
        body = re.sub(rf'(?m)^{re.escape(key)}[ \t]*=.*(\n|$)', "", body, count=1)
    return text[:start] + body + text[end:]


def set_hashes(text: str, hashes: dict[str, str], written_by: str) -> str:
    """Replace (or add) the ``[hashes]`` table with ``hashes`` (name -> ``sha256:...``)."""
    table = f"[hashes]\n# SHA-256 of each artefact, written by {written_by}.\n" + "".join(
        f'"{name}" = "{digest}"\n' for name, digest in sorted(hashes.items()))
    span = _table_span(text, "hashes")
    if span is None:
        return text.rstrip("\n") + "\n\n" + table
    header = re.search(r"(?m)^\[hashes\][ \t]*(#.*)?$", text)
    end = span[1]
    return text[:header.start()] + table + ("\n" if end < len(text) else "") + text[end:]


def device_uid_for(model_file: Path) -> str:
    """A device UID derived from the model file's SHA-256: a model that changes gets a new one
    (PS3.3 C.17.8, Device UID of the observer: one trained instance, one UID)."""
    return derived_uid("device", file_sha256(model_file).removeprefix("sha256:"))


def record(package_dir: Path, written_by: str, model: dict[str, object] | None = None,
           artefacts: list[str] | None = None) -> ModelPackage:
    """Rewrite ``package_dir/manifest.toml``: the ``[model]`` keys in ``model``, a device UID
    derived from the model file, and the hashes of ``artefacts`` (default: those already listed
    plus the model file).  Returns the package as the node would load it."""
    manifest = package_dir / "manifest.toml"
    text = manifest.read_text()
    before = load_package(package_dir) if not model or "file" not in model else None
    model = dict(model or {})
    model_file = str(model.get("file") or (before.model_file if before else "model.onnx"))
    model["device_uid"] = device_uid_for(package_dir / model_file)
    text = set_keys(text, "model", model, {
        "device_uid": "derived from the SHA-256 of the model file: a model that changes gets a new one"})
    names = set(artefacts) if artefacts is not None else set(before.hashes if before else ())
    names.add(model_file)
    hashes = {name: file_sha256(package_dir / name) for name in names}
    tmp = manifest.with_suffix(".toml.tmp")
    tmp.write_text(set_hashes(text, hashes, written_by))
    tmp.replace(manifest)
    pkg = load_package(package_dir)
    pkg.verify_hashes()
    return pkg


def load_manifest(package_dir: Path) -> ModelPackage:
    """The package as :func:`load_package` reads it, also before a first export (or a training
    run) has written its model file."""
    package_dir = Path(package_dir)
    manifest = package_dir / "manifest.toml"
    if not manifest.is_file():
        raise ManifestError(f"{package_dir}: no manifest.toml; a model package is a folder with a manifest "
                            "(copy appliance/model_packages/cxr-triage/manifest.toml and edit it)")
    try:
        model = tomllib.loads(manifest.read_text()).get("model")
        model_file = model.get("file", "model.onnx") if isinstance(model, dict) else None
    except tomllib.TOMLDecodeError:
        model_file = None
    # A manifest that does not parse, or names an odd file, gets load_package's own error.
    if not isinstance(model_file, str) or "/" in model_file or (package_dir / model_file).exists():
        return load_package(package_dir)
    # A first export: load a copy beside a placeholder, which still raises every other problem.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(manifest, tmp)
        (Path(tmp) / model_file).touch()
        return dataclasses.replace(load_package(tmp), path=package_dir)


def copy_package(source: Path, target: Path, artefacts: list[str] | None = None) -> None:
    """A new package folder with ``source``'s manifest and model card and the named artefacts."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ["manifest.toml", "MODEL_CARD.md", *(artefacts or [])]:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
